"""The decode GEMMs of `tessera.quant.gemv_kernels` (FP8 W8A8 in its three scale schemes, MXFP4 W4A16)
against float64 math on the dequantized weight (and, for FP8, the dequantized activations): partial N
and K tiles, bias on and off, split K and not, the MXFP4 decode exact for every e2m1 code (in the MMA
kernels and in the one-row FMA kernel, which one row of x takes), padded rows that never reach real
ones. Triton runs in its
interpreter here (TRITON_INTERPRET=1, set by conftest without a GPU); on a GPU the same tests run the
compiled kernels, and the `gpu` ones check the dispatch, Llama-3-8B shapes and graph replays.

Tolerances (relative Frobenius error): the weights are exact in the activations' dtype and products sum
in float32, so float32 x differs from float64 by summation order (~1e-7; on a GPU TF32 rounds x to 10
mantissa bits: ~5e-4), while bf16 / fp16 outputs are off by their one rounding (2^-9 / 2^-12 relative,
up to twice that where the interpreter truncates instead of rounding).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

from tessera.quant import fp8, mxfp4

from .conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gemv = fp8.gemv_kernels
pytestmark = pytest.mark.skipif(
    gemv is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton, and on a CPU its interpreter (TRITON_INTERPRET=1)",
)
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 3e-3, torch.bfloat16: 8e-3, torch.float16: 2e-3}
# 3 splits of K = 384 (2 of 256 or 200), the last one short where K = 200; BLOCK_K 64 divides 128
SPLIT = gemv.GemvConfig(block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=2) if gemv else None
# (dtype of x, with bias, config): the default (no split at these sizes) and the split-K one
CASES = [(torch.float32, True, None), (torch.bfloat16, False, SPLIT), (torch.float16, True, SPLIT)]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows from 1e-4 to 1e2 in magnitude, so every row, block and group gets a scale of its own."""
    return _randn(n, k, seed=seed) * torch.logspace(-4, 2, n)[:, None]


def _assert_close(
    out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> None:
    """out (`dtype`) against x @ w.T + bias in float64: relative error overall, and each element within
    TOL of its terms' magnitude |x| @ |w|.T + |bias| (which holds for every row of w whatever its scale,
    and for sums that cancel)."""
    ref, size = x.double() @ w.double().T, x.double().abs() @ w.double().abs().T
    if bias is not None:
        ref, size = ref + bias.double(), size + bias.double().abs()
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.cpu(), ref) < tol
    assert ((out.cpu().double() - ref).abs() <= tol * size).all()


def _on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def _activations(m: int, n: int, k: int, dtype: torch.dtype, with_bias: bool) -> tuple:
    """x [m, k] and bias [n] (or None; as spread as the weight's rows) in `dtype`, on the CPU."""
    bias = _randn(n, seed=1) * torch.logspace(-4, 2, n) if with_bias else None
    return _randn(m, k, seed=m).to(dtype), None if bias is None else bias.to(dtype)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(48, 256), (130, 200)])  # 130, 200: partial 128-blocks and K tiles
@pytest.mark.parametrize("scheme", fp8.SCHEMES)
def test_fp8_gemv_matches_float64(scheme: str, n: int, k: int, m: int) -> None:
    q, scale = fp8.quantize_weight(_weight(n, k, seed=n + k), scheme)
    w = fp8.dequantize_weight(q, scale, scheme)
    q, scale = _on_device(q, scale)
    group = fp8.act_group(scheme)
    # and the fp8 tiles straight into the MMA, split along K
    native_mma = (torch.bfloat16, True, dataclasses.replace(SPLIT, native_mma=True))
    for dtype, with_bias, config in [*CASES, native_mma]:
        x, bias = _activations(m, n, k, dtype, with_bias)
        xq, xs = fp8.quantize_act_reference(x, group)
        dev_bias = None if bias is None else bias.to(DEVICE)
        out = gemv.fp8_gemv(*_on_device(xq, xs), q, scale, scheme, dtype, dev_bias, config)
        _assert_close(out, fp8.dequantize_act(xq, xs, group), w, bias, dtype)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(48, 256), (130, 384)])  # 384: the default's 2nd K step half masked
def test_mxfp4_gemv_matches_float64(n: int, k: int, m: int) -> None:
    blocks, scales = mxfp4.quantize(_weight(n, k, seed=n + k))
    w = mxfp4.dequantize(blocks, scales)
    blocks, scales = _on_device(blocks, scales)
    # and the codes and scales straight into `tl.dot_scaled`, split along K and not
    native = [(torch.bfloat16, True, dataclasses.replace(SPLIT, native_mma=True)),
              (torch.float16, False, gemv.GemvConfig(32, 256, native_mma=True))]  # fmt: skip
    for dtype, with_bias, config in [*CASES, *native]:
        x, bias = _activations(m, n, k, dtype, with_bias)
        out = gemv.mxfp4_gemv(x.to(DEVICE), blocks, scales, None if bias is None else bias.to(DEVICE), config)
        _assert_close(out, x, w, bias, dtype)


def test_mxfp4_decode_is_exact_for_every_code() -> None:
    """Weight row c holds code c in both nibbles of most bytes (other bytes: other codes in each nibble),
    under scales 2^0, 2^-27 and 2^23; one-hot rows of x read the weights back exactly."""
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes | codes << 4)[:, None].repeat(1, 16)
    blocks[:, 1] = (codes + 3) % 16 << 4 | (codes + 5) % 16
    scales = torch.tensor([127] * 6 + [100] * 5 + [150] * 5, dtype=torch.uint8)[:, None]
    out = gemv.mxfp4_gemv(torch.eye(16, 32, device=DEVICE), *_on_device(blocks, scales))
    assert torch.equal(out.cpu(), mxfp4.dequantize(blocks, scales)[:, :16].T)
    # `tl.dot_scaled` in bfloat16, whose 8 exponent bits hold every one of these values too
    native = gemv.GemvConfig(16, 32, native_mma=True)
    eye = torch.eye(16, 32, device=DEVICE, dtype=torch.bfloat16)
    out = gemv.mxfp4_gemv(eye, *_on_device(blocks, scales), config=native)
    assert torch.equal(out.cpu().float(), mxfp4.dequantize(blocks, scales)[:, :16].T)


def _launched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, gemv.GemvConfig]]:
    """The (kernel name, config) of every launch from here on; the launches still run."""
    launched: list[tuple[str, gemv.GemvConfig]] = []
    launch = gemv.launch

    def record(kernel: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        launched.append((kernel.__name__, args[5]))
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(gemv, "launch", record)
    return launched


ROW_KERNEL, MMA_KERNEL = "_mxfp4_row_kernel", "_mxfp4_gemv_kernel"


@pytest.mark.parametrize(("n", "k"), [(48, 256), (130, 384)])
def test_mxfp4_one_row_kernel_matches_float64(n: int, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """One row of x: the FMA kernel by default (no split at these sizes) and with `fma` configs: split K
    in 3 (2 where K = 256), N tiles of 16 and 32 (130 rows: a partial one), K steps of 64 to 256 (of 32:
    `test_mxfp4_one_row_decode_is_exact_for_every_code`), either decode (`f32_decode`)."""
    blocks, scales = mxfp4.quantize(_weight(n, k, seed=n + k))
    w = mxfp4.dequantize(blocks, scales)
    blocks, scales = _on_device(blocks, scales)
    split = dataclasses.replace(SPLIT, fma=True)
    f32 = dataclasses.replace(split, f32_decode=True)
    cases = [(torch.float32, True, None), (torch.bfloat16, False, split), (torch.float16, True, split),
             (torch.bfloat16, True, gemv.GemvConfig(16, 128, fma=True)), (torch.bfloat16, True, f32),
             (torch.float32, False, gemv.GemvConfig(16, 64, fma=True, f32_decode=True))]  # fmt: skip
    launched = _launched(monkeypatch)
    for dtype, with_bias, config in cases:
        x, bias = _activations(1, n, k, dtype, with_bias)
        out = gemv.mxfp4_gemv(x.to(DEVICE), blocks, scales, None if bias is None else bias.to(DEVICE), config)
        _assert_close(out, x, w, bias, dtype)
    assert [name for name, _ in launched] == [ROW_KERNEL] * len(cases)
    assert launched[0][1] == gemv.mxfp4_config(n, k) and launched[0][1].split_k == 1


def test_mxfp4_one_row_decode_is_exact_for_every_code() -> None:
    """`test_mxfp4_decode_is_exact_for_every_code`'s weight, plus two all-zero blocks (scales 2^0 and
    e8m0 0), read back one column at a time by one-hot rows of x through the FMA kernel."""
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = torch.cat([(codes | codes << 4)[:, None].repeat(1, 16), torch.zeros(2, 16, dtype=torch.uint8)])
    blocks[:16, 1] = (codes + 3) % 16 << 4 | (codes + 5) % 16
    scales = torch.tensor([127] * 6 + [100] * 5 + [150] * 5 + [127, 0], dtype=torch.uint8)[:, None]
    want = mxfp4.dequantize(blocks, scales)
    dev_blocks, dev_scales = _on_device(blocks, scales)
    fma = gemv.GemvConfig(16, 32, fma=True)
    for config in (None, fma, dataclasses.replace(fma, f32_decode=True)):
        got = torch.cat([gemv.mxfp4_gemv(row[None], dev_blocks, dev_scales, config=config).cpu()
                         for row in torch.eye(32, device=DEVICE)])  # fmt: skip
        assert torch.equal(got, want.T)


def test_mxfp4_dispatch_by_rows_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row takes the FMA kernel where its config says `fma` (the default does; a card's table entry
    "mxfp4_m1" decides where there is one), more rows the MMA kernel with the config's tiles (the table's
    "mxfp4"), `fma` or not; only MXFP4 takes `fma`."""
    from tessera.layers import gemv_tuned

    blocks, scales = _on_device(*mxfp4.quantize(_weight(48, 256, seed=9)))
    x = _randn(2, 256, seed=10).bfloat16().to(DEVICE)
    fma, mma = gemv.GemvConfig(16, 64, 2, fma=True), gemv.GemvConfig(32, 128)
    launched = _launched(monkeypatch)
    for rows, config in [(1, None), (2, None), (1, fma), (2, fma), (1, mma)]:
        gemv.mxfp4_gemv(x[:rows], blocks, scales, config=config)
    kernels = [name for name, _ in launched if name != "_split_sum_kernel"]
    assert kernels == [ROW_KERNEL, MMA_KERNEL, ROW_KERNEL, MMA_KERNEL, MMA_KERNEL]
    tables = {"mxfp4_m1": vars(fma), "mxfp4": vars(mma)}
    asked: list[str] = []
    monkeypatch.setattr(gemv_tuned, "lookup", lambda d, fmt, n, k: asked.append(fmt) or tables.get(fmt))
    launched.clear()
    gemv.mxfp4_gemv(x[:1], blocks, scales)
    gemv.mxfp4_gemv(x, blocks, scales)
    assert asked == ["mxfp4_m1", "mxfp4"] and launched == [(ROW_KERNEL, fma), (MMA_KERNEL, mma)]
    tables["mxfp4_m1"] = vars(mma)  # where the sweep found an MMA config fastest at one row
    launched.clear()
    gemv.mxfp4_gemv(x[:1], blocks, scales)
    assert launched == [(MMA_KERNEL, mma)]
    xq, xs = _on_device(*fp8.quantize_act_reference(_randn(1, 256, seed=4), fp8.BLOCK))
    q, scale = _on_device(*fp8.quantize_weight(_weight(48, 256, seed=5), "block"))
    with pytest.raises(ValueError, match="fma"):
        gemv.fp8_gemv(xq, xs, q, scale, "block", torch.bfloat16, config=gemv.GemvConfig(32, 128, fma=True))
    with pytest.raises(ValueError, match="f32_decode"):
        gemv.mxfp4_gemv(x, blocks, scales, config=gemv.GemvConfig(32, 128, f32_decode=True))


def _poison(x: torch.Tensor) -> torch.Tensor:
    bad = x.clone()
    bad[1], bad[4, 5] = float("nan"), 1e30
    return bad


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4", "mxfp4_native"])
def test_padded_rows_never_reach_real_rows(fmt: str) -> None:
    n, k, m = 48, 256, gemv.MAX_ROWS
    x = _randn(m, k, seed=2).bfloat16().to(DEVICE)
    if fmt == "fp8":
        q, scale = _on_device(*fp8.quantize_weight(_weight(n, k, seed=3), "block"))

        def run(x: torch.Tensor) -> torch.Tensor:  # the rows' own activation scales, then the GEMM
            xq, xs = fp8.quantize_act_reference(x, fp8.BLOCK)
            return gemv.fp8_gemv(xq, xs, q, scale, "block", x.dtype, config=SPLIT)
    else:
        blocks, scales = _on_device(*mxfp4.quantize(_weight(n, k, seed=3)))
        config = dataclasses.replace(SPLIT, native_mma=fmt == "mxfp4_native")
        run = lambda x: gemv.mxfp4_gemv(x, blocks, scales, config=config)  # noqa: E731
    clean, poisoned = run(x), run(_poison(x))
    keep = [i for i in range(m) if i not in (1, 4)]
    assert torch.equal(poisoned[keep], clean[keep]) and clean.isfinite().all()
    assert not poisoned[1].isfinite().any()  # the NaN row stays its own problem


def test_configs_depend_on_the_shape_and_are_checked() -> None:
    """Every Llama-3-8B shape gets at least ~2 programs per SM of an H100 (132 SMs) by default."""
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]:
        configs = [gemv.fp8_config(scheme, n, k) for scheme in ("per_channel", "block")]
        for cfg in [*configs, gemv.mxfp4_config(n, k)]:
            assert -(-n // cfg.block_n) * cfg.split_k >= 256, (n, k, cfg)
    assert gemv.fp8_config("block", 4096, 4096).block_k <= 128
    xq, xs = _on_device(*fp8.quantize_act_reference(_randn(1, 256, seed=4), fp8.BLOCK))
    q, scale = _on_device(*fp8.quantize_weight(_weight(48, 256, seed=5), "block"))
    with pytest.raises(ValueError, match="block_k"):
        gemv.fp8_gemv(xq, xs, q, scale, "block", torch.bfloat16, config=gemv.GemvConfig(32, 256))
    with pytest.raises(ValueError, match="power of two"):
        gemv.fp8_gemv(xq, xs, q, scale, "block", torch.bfloat16, config=gemv.GemvConfig(48, 64))
    blocks, scales = _on_device(*mxfp4.quantize(_weight(48, 256, seed=5)))
    with pytest.raises(ValueError, match="native_mma"):
        gemv.mxfp4_gemv(xq.float(), blocks, scales, config=gemv.GemvConfig(32, 64, native_mma=True))
    big_q, big_s = _on_device(*fp8.quantize_act_reference(_randn(17, 256, seed=6), fp8.BLOCK))
    with pytest.raises(ValueError, match="M <= 16"):
        gemv.fp8_gemv(big_q, big_s, q, scale, "block", torch.bfloat16)


def _llama_case(fmt: str, n: int, k: int) -> tuple:
    """The op's weight arguments and its float32 reference x -> y."""
    w = torch.randn(n, k, device="cuda") * 0.02
    if fmt == "mxfp4":
        blocks, scales = mxfp4.quantize(w)
        dense = mxfp4.dequantize(blocks, scales)
        return (blocks, scales), lambda x: x.float() @ dense.T
    q, scale = fp8.quantize_weight(w, fmt)
    return (q, scale, fmt), lambda x: fp8._reference_linear(x.float(), q, scale, fmt, None)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (4096, 14336), (28672, 4096)])
@pytest.mark.parametrize("fmt", ["per_channel", "block", "mxfp4"])
def test_gpu_public_ops_take_the_gemv_path_and_replay_bit_identical(
    fmt: str, n: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FP8 decode takes the kernel where the card's table has the shape: here a table of the shape
    rule's configs (MXFP4 decode takes it without one: its defaults, the FMA kernel at one row)."""
    from tessera.layers import gemv_tuned

    def table(device: torch.device, name: str, n: int, k: int) -> dict[str, int] | None:
        if name.startswith("mxfp4"):
            return None
        return vars(gemv.fp8_config("block" if name == "fp8_block" else "per_channel", n, k))

    monkeypatch.setattr(gemv_tuned, "lookup", table)
    weight, reference = _llama_case(fmt, n, k)
    op = mxfp4.mxfp4_linear if fmt == "mxfp4" else fp8.fp8_linear
    for m in (1, 8, gemv.MAX_ROWS):
        x = torch.randn(m, k, device="cuda").bfloat16()
        before = fp8.path_counts["gemv"]
        out = op(x, *weight)
        assert fmt == "mxfp4" or fp8.path_counts["gemv"] == before + 1
        assert rel_err(out, reference(x)) < TOL[torch.bfloat16]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = op(x, *weight)
        graph.replay()
        assert torch.equal(replayed, out)  # split K or not: the same sums in the same order
    if fmt != "mxfp4":
        before = fp8.path_counts["gemv"]
        op(torch.randn(gemv.MAX_ROWS + 1, k, device="cuda").bfloat16(), *weight)
        assert fp8.path_counts["gemv"] == before  # past MAX_ROWS: the W8A8 GEMMs


def test_fp8_decode_takes_the_kernel_only_where_the_card_is_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.layers import gemv_tuned

    monkeypatch.setattr(gemv_tuned, "lookup", lambda device, fmt, n, k: {"block_n": 32, "block_k": 128}
                        if (fmt, n) == ("fp8_block", 4096) else None)  # fmt: skip
    device = torch.device(DEVICE)
    assert gemv.fp8_tuned(device, "block", 4096, 4096)
    assert not gemv.fp8_tuned(device, "per_channel", 4096, 4096)  # that table has block configs only
    assert not gemv.fp8_tuned(device, "block", 6144, 4096)


def test_usable_probes_each_format_once_and_refuses_a_broken_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    device = torch.device(DEVICE)
    monkeypatch.setattr(gemv, "_USABLE", {})
    assert gemv.usable(device, "fp8") and gemv.usable(device, "mxfp4")
    calls: list[int] = []

    def broken(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(gemv, "_USABLE", {})
    monkeypatch.setattr(gemv, "mxfp4_gemv", broken)
    assert not gemv.usable(device, "mxfp4") and not gemv.usable(device, "mxfp4")
    assert calls == [1] and "no kernel here" in caplog.text  # probed once, the reason logged
    monkeypatch.setattr(gemv, "_USABLE", {})
    monkeypatch.setattr(gemv, "mxfp4_gemv", lambda x, b, s: torch.zeros(x.shape[0], b.shape[0]))
    assert not gemv.usable(device, "mxfp4")  # runs, but wrong


def test_tuned_tables_round_trip_and_the_env_folder_wins(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.layers import gemv_tuned

    name = "NVIDIA H100 80GB HBM3"
    assert gemv_tuned.file_name(name) == "NVIDIA_H100_80GB_HBM3.json"
    cfg = {"block_n": 32, "block_k": 512, "split_k": 4, "num_warps": 8, "num_stages": 3}
    env, other = tmp_path / "env", tmp_path / "other"
    gemv_tuned.save(env, name, {"fp8": {"4096,4096": cfg}})
    gemv_tuned.save(env, name, {"mxfp4": {"6144,4096": {**cfg, "split_k": 1}}})  # merged, not replaced
    gemv_tuned.save(other, name, {"fp8": {"4096,4096": {**cfg, "num_warps": 4}}})
    gemv_tuned.save(other, name, {"bf16": {"4096,4096": cfg, "6144,4096": cfg}})
    gemv_tuned.save(other, name, {"bf16": {"6144,4096": None}})  # a later sweep: cuBLAS wins there
    monkeypatch.setattr(gemv_tuned, "PACKAGED", other)
    monkeypatch.setenv(gemv_tuned.ENV, str(env))
    table = gemv_tuned.load(name)
    assert table["fp8"]["4096,4096"] == cfg and table["mxfp4"]["6144,4096"]["split_k"] == 1
    monkeypatch.delenv(gemv_tuned.ENV)
    assert gemv_tuned.load(name)["fp8"]["4096,4096"]["num_warps"] == 4
    assert list(gemv_tuned.load(name)["bf16"]) == ["4096,4096"]
    assert gemv_tuned.load("AMD Instinct MI300X") == {}


def test_a_tuned_config_reaches_the_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.layers import gemv_tuned

    tuned = {"block_n": 32, "block_k": 64, "split_k": 3, "num_warps": 4, "num_stages": 2}
    asked: list[tuple] = []

    def lookup(device: torch.device, fmt: str, n: int, k: int) -> dict | None:
        asked.append((fmt, n, k))
        return tuned if fmt == "mxfp4" else None

    monkeypatch.setattr(gemv_tuned, "lookup", lookup)
    w = _weight(48, 384, seed=7)
    x = _randn(2, 384, seed=8)
    blocks, scales = _on_device(*mxfp4.quantize(w))
    (xd,) = _on_device(x)
    want = x.double() @ mxfp4.dequantize(blocks.cpu(), scales.cpu()).double().T
    got = gemv.mxfp4_gemv(xd, blocks, scales).cpu()
    assert rel_err(got, want) < TOL[torch.float32]  # split in 3, as tuned
    xq, xs = _on_device(*fp8.quantize_act_reference(x, fp8.BLOCK))
    q, scale = _on_device(*fp8.quantize_weight(w, "block"))
    gemv.fp8_gemv(xq, xs, q, scale, "block", torch.bfloat16)
    assert asked == [("mxfp4", 48, 384), ("fp8_block", 48, 384)]
    launched: list = []
    monkeypatch.setattr(gemv, "launch", lambda *args, **kw: launched.append(args[6]))
    gemv.mxfp4_gemv(xd, blocks, scales)
    gemv.fp8_gemv(xq, xs, q, scale, "block", torch.bfloat16)
    assert launched == [gemv.GemvConfig(**tuned), gemv.fp8_config("block", 48, 384)]


def test_the_sweep_picks_the_config_closest_to_each_rows_best() -> None:
    from benchmarks.decode_gemm import pick_configs

    def fields(block_n: int) -> dict:
        return {"block_n": block_n, "block_k": 256, "split_k": 1, "num_warps": 4, "num_stages": 4,
                "native_mma": False, "fma": False, "f32_decode": False}  # fmt: skip

    def trial(block_n: int, us: float | None) -> dict:
        return {**fields(block_n), **({"us": us} if us is not None else {"error": "OutOfResources"})}

    def case(fmt: str, m: int, times: dict[int, float | None]) -> dict:
        trials = [trial(bn, us) for bn, us in times.items()]
        return {"format": fmt, "n": 4096, "k": 4096, "m": m, "trials": trials}

    def cublas(m: int, us: float) -> dict:
        return {"format": "bf16", "n": 4096, "k": 4096, "m": m, "us": us}

    # 16 is best at M = 1 but 1.5x the best at M = 8; 32 is within 1.1x at both; 64 failed at M = 8
    times = ({16: 10.0, 32: 11.0, 64: 10.5}, {16: 30.0, 32: 22.0, 64: None})
    for fmt in ("fp8", "bf16"):
        swept = [case(fmt, 1, times[0]), case(fmt, 8, times[1])]
        # a dense config is kept only where it beats cuBLAS at every M
        assert pick_configs(swept, [cublas(1, 12.0), cublas(8, 25.0)]) == {fmt: {"4096,4096": fields(32)}}
        # (22 is under 21 / 0.95: not a clear win)
        slower = pick_configs(swept, [cublas(1, 12.0), cublas(8, 23.0)])
        assert slower == {fmt: {"4096,4096": None if fmt == "bf16" else fields(32)}}


def test_the_sweep_picks_mxfp4_one_row_configs_apart() -> None:
    """MXFP4 sweeps its one-row kernel at M = 1 only; M = 1's pick ("mxfp4_m1": the fastest there, of
    either kernel) and the other M's ("mxfp4": the MMA configs) are made and saved apart."""
    from benchmarks.decode_gemm import pick_configs, sweep_configs

    one, more = sweep_configs("mxfp4", 4096, 14336, 1), sweep_configs("mxfp4", 4096, 14336, 4)
    assert one[0] == gemv.mxfp4_config(4096, 14336) and one[0].fma
    assert not any(cfg.fma for cfg in more) and more[0] == dataclasses.replace(one[0], fma=False)
    assert [cfg for cfg in one if not cfg.fma] == more[1:] and len(one) <= 53
    assert {cfg.f32_decode for cfg in one if cfg.fma} == {False, True}
    assert not any(cfg.f32_decode for cfg in more)
    assert not any(cfg.fma for cfg in sweep_configs("fp8", 4096, 14336, 1))

    def trial(cfg: gemv.GemvConfig, us: float) -> dict:
        return {**vars(cfg), "us": us}

    def case(m: int, trials: list[dict]) -> dict:
        return {"format": "mxfp4", "n": 4096, "k": 14336, "m": m, "trials": trials}

    fma, mma = gemv.GemvConfig(64, 512, 2, fma=True), gemv.GemvConfig(64, 256, 4)
    other = gemv.GemvConfig(32, 64)
    # M = 1: the FMA kernel by far; M = 4 and 8: `mma` within 1.03x of the best at both
    swept = [case(1, [trial(mma, 40.0), trial(other, 45.0), trial(fma, 20.0)]),
             case(4, [trial(mma, 41.0), trial(other, 50.0)]),
             case(8, [trial(mma, 44.0), trial(other, 43.0)])]  # fmt: skip
    picked = pick_configs(swept, [])
    assert picked == {"mxfp4_m1": {"4096,14336": vars(fma)}, "mxfp4": {"4096,14336": vars(mma)}}
    swept[0]["trials"][-1]["us"] = 60.0  # the MMA kernel at one row, where it wins there
    assert pick_configs(swept, [])["mxfp4_m1"] == {"4096,14336": vars(mma)}


def test_the_sweep_times_only_configs_that_compute_the_right_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config whose result differs from the default config's (here: N tiles of 64 without a split
    scale it, 8 warps over 4 splits give NaN) is noted as wrong and never timed, so it is never picked."""
    import benchmarks.decode_gemm as sweep

    def call(x: torch.Tensor, w: tuple[torch.Tensor, ...], cfg: gemv.GemvConfig) -> torch.Tensor:
        out = x @ w[0].T
        if cfg.split_k == 4 and cfg.num_warps == 8:
            return out * float("nan")
        wrong = cfg.block_n == 64 and cfg.split_k == 1
        return out * (1.1 if wrong else 1.0) + 1e-4 * cfg.num_warps  # (rounding-sized: still right)

    timed: list[torch.Tensor] = []
    monkeypatch.setitem(sweep.SWEEP, "bf16", (call, *sweep.SWEEP["bf16"][1:]))
    monkeypatch.setattr(sweep, "time_op", lambda op, copies, x, bw: timed.append(x) or {"us": 1.0})
    w = torch.randn(4096, 4096) * 0.02
    result = sweep.sweep_case("bf16", [(w,)], torch.randn(8, 4096), 1.0)
    trials = result["trials"]
    wrong = [
        t
        for t in trials
        if (t["block_n"], t["split_k"]) == (64, 1) or (t["split_k"], t["num_warps"]) == (4, 8)
    ]
    right = [t for t in trials if t not in wrong]
    assert wrong and right and len(timed) == len(right)
    assert all(t["error"].startswith("wrong result") and "us" not in t for t in wrong)
    assert all("us" in t for t in right) and result["best"] in right
