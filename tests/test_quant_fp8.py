"""FP8 W8A8: weight formats and their error bounds, the activation quantizer, `tessera::fp8_linear` against
a float32 "dequantize, then matmul" reference, padded rows that cannot reach real rows, the ROCm fnuz
conversion (simulated), and the Triton kernels (interpreter on a CPU, compiled on a GPU).

Error bounds. e4m3 keeps 3 mantissa bits, so round-to-nearest of a normal value is off by at most 2^-4 of
it; below the smallest normal (2^-6 for fn, 2^-7 for fnuz) the spacing is fixed (2^-9 / 2^-10), off by
at most 2^-10 in scaled units. Per element: |deq - w| <= 2^-4 |w| + 2^-10 s, with s the element's scale
(its tensor's / row's / block's amax over 448), which is under 2^-3 of that range's amax. A kernel that
multiplies the same fp8 values in float32 differs from the reference only by summation order (~K 2^-24),
and by one rounding to the output dtype (2^-9 relative for bfloat16).
"""

from __future__ import annotations

import os

import pytest
import torch

from tessera.quant import fp8

from .conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
# (N, K): odd N; the block scheme with a partial 128-row block
SHAPES = {"per_tensor": (37, 64), "per_channel": (37, 64), "block": (200, 384)}
needs_kernels = pytest.mark.skipif(
    fp8.fp8_kernels is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the fp8 Triton kernels need triton (and its interpreter without a GPU)",
)


def _randn(*shape: int, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _spread_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows from 1e-3 to 1e3 in magnitude: one scale for all of them would flush the small ones."""
    return w * torch.logspace(-3, 3, w.shape[0], device=w.device)[:, None]


def _element_scale(scale: torch.Tensor, scheme: str, n: int, k: int) -> torch.Tensor:
    if scheme == "block":
        return fp8._expand_blocks(scale, n, k)
    return scale.reshape(-1, 1).expand(n, k) if scheme == "per_channel" else scale.expand(n, k)


@pytest.mark.parametrize("dtype", [FN, FNUZ])
@pytest.mark.parametrize("scheme", fp8.SCHEMES)
def test_weight_round_trip_is_within_the_e4m3_bound(scheme: str, dtype: torch.dtype) -> None:
    n, k = SHAPES[scheme]
    w = _randn(n, k, seed=1)
    w = _spread_rows(w) if scheme != "per_tensor" else w
    q, scale = fp8.quantize_weight(w.bfloat16(), scheme, dtype)
    assert q.dtype == dtype and q.shape == (n, k) and scale.dtype == torch.float32
    assert scale.shape == {"per_tensor": (1,), "per_channel": (n,), "block": (2, 3)}[scheme]
    w = w.bfloat16().float()
    err = (fp8.dequantize_weight(q, scale, scheme) - w).abs()
    s = _element_scale(scale, scheme, n, k)
    assert (err <= (2**-4 * w.abs() + 2**-10 * s) * (1 + 1e-6)).all()
    assert (err <= 2**-3 * fp8.fp8_max(dtype) * s).all()  # under 2^-3 of the range's amax
    assert err.max() > 0  # really quantized


def test_per_channel_scales_keep_small_rows_that_one_scale_flushes() -> None:
    w = _spread_rows(_randn(32, 64, seed=2))
    for scheme, worst in (("per_channel", 2**-4), ("per_tensor", 0.5)):
        deq = fp8.dequantize_weight(*fp8.quantize_weight(w, scheme), scheme)
        row_err = ((deq - w).norm(dim=1) / w.norm(dim=1)).max().item()
        assert row_err <= worst if scheme == "per_channel" else row_err > worst


def test_block_scale_inv_multiplies_its_128x128_block() -> None:
    n, k = 200, 300  # DeepSeek layout: scale_inv [ceil(N/128), ceil(K/128)]
    q = (_randn(n, k, seed=3) * 100).to(FN)
    scale_inv = _randn(2, 3, seed=4).abs() + 0.1
    deq = fp8.dequantize_weight(q, scale_inv, "block")
    for i, j in ((0, 0), (127, 128), (128, 127), (199, 299), (150, 260)):
        assert deq[i, j] == q[i, j].float() * scale_inv[i // 128, j // 128]
    _, s2 = fp8.quantize_weight(_randn(n, k, seed=5) * torch.arange(1.0, k + 1), "block")
    assert s2.shape == (2, 3) and (s2[:, 2] > s2[:, 0] * 2).all()  # each block its own amax


@pytest.mark.parametrize("group", [0, 128])
def test_activation_reference_scales_each_row_or_group(group: int) -> None:
    x = _spread_rows(_randn(6, 300, seed=6))
    x[2] = 0  # an all-zero row: finite scale, zero codes
    q, s = fp8.quantize_act_reference(x, group, FN)
    assert s.shape == (6, 1 if group == 0 else 3)
    g = group or 300
    chunks = [x[:, i : i + g].abs().amax(1) for i in range(0, 300, g)]
    expected = torch.stack(chunks, 1).clamp_min(1e-12) / 448
    assert torch.equal(s, expected) and torch.isfinite(s).all() and not q[2].float().any()
    deq, per_element = fp8.dequantize_act(q, s, group), fp8.dequantize_act(torch.ones_like(q), s, group)
    assert ((deq - x).abs() <= 2**-4 * x.abs() + 2**-10 * per_element).all()


def _linear_reference(x, q, scale, scheme, bias=None) -> torch.Tensor:
    group = fp8.act_group(scheme)
    xq, xs = fp8.quantize_act_reference(x.reshape(-1, x.shape[-1]), group, q.dtype)
    out = fp8.dequantize_act(xq, xs, group) @ fp8.dequantize_weight(q, scale, scheme).T
    return out if bias is None else out + bias.float()


@pytest.mark.parametrize("m", [1, 3, 16, 100])
@pytest.mark.parametrize("scheme", fp8.SCHEMES)
def test_fp8_linear_cpu_matches_the_float32_reference(scheme: str, m: int) -> None:
    n, k = SHAPES[scheme]
    w, x, bias = _randn(n, k, seed=7), _randn(m, k, seed=8), _randn(n, seed=9)
    q, scale = fp8.quantize_weight(w, scheme)
    ref = _linear_reference(x, q, scale, scheme, bias)
    out = fp8.fp8_linear(x, q, scale, scheme, bias)
    assert out.shape == (m, n) and rel_err(out, ref) < 1e-6  # the same arithmetic
    assert rel_err(out, x @ w.T + bias) < 2**-3  # W8A8 against full precision (~0.04 measured)
    out_bf16 = fp8.fp8_linear(x.bfloat16().view(1, m, k), q, scale, scheme, bias.bfloat16())
    ref_bf16 = _linear_reference(x.bfloat16(), q, scale, scheme, bias.bfloat16())
    assert out_bf16.dtype == torch.bfloat16 and out_bf16.shape == (1, m, n)
    assert rel_err(out_bf16[0], ref_bf16) < 2**-8


def _poison(x: torch.Tensor) -> torch.Tensor:
    bad = x.clone()
    bad[1], bad[4, 5] = float("nan"), 1e30
    return bad


@pytest.mark.parametrize("scheme", fp8.SCHEMES)
def test_poisoned_rows_leave_the_other_rows_bit_identical(scheme: str) -> None:
    n, k = SHAPES[scheme]
    q, scale = fp8.quantize_weight(_randn(n, k, seed=10).to(DEVICE), scheme)
    x = _randn(8, k, seed=11, device=DEVICE).bfloat16()
    keep = torch.tensor([0, 2, 3, 5, 6, 7], device=DEVICE)
    xq, xs = fp8.quantize_act(x, fp8.act_group(scheme))
    pq, ps = fp8.quantize_act(_poison(x), fp8.act_group(scheme))
    assert torch.equal(pq[keep].view(torch.uint8), xq[keep].view(torch.uint8))
    assert torch.equal(ps[keep], xs[keep])
    clean, poisoned = fp8.fp8_linear(x, q, scale, scheme), fp8.fp8_linear(_poison(x), q, scale, scheme)
    assert torch.equal(poisoned[keep], clean[keep]) and clean.isfinite().all()
    assert not poisoned[1].isfinite().any()  # the NaN row stays its own problem


# NOTE: opcheck's test_schema compares every input before and after the call with torch.allclose, which
# has no fp8 kernel ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'); fp8_linear takes an fp8
# weight, so its schema test is done here by hand: no input changes, the output aliases none.
FP8_INPUT_OPCHECKS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_ops_pass_opcheck() -> None:
    x = _randn(5, 256, seed=12)
    torch.library.opcheck(torch.ops.tessera.fp8_quantize_act.default, (x, 0))
    torch.library.opcheck(torch.ops.tessera.fp8_quantize_act.default, (x, 128))
    for scheme in fp8.SCHEMES:
        q, scale = fp8.quantize_weight(_randn(130, 256, seed=13), scheme)
        for bias in (None, _randn(130, seed=14)):
            args = (x, q, scale, scheme, bias)
            torch.library.opcheck(torch.ops.tessera.fp8_linear.default, args, test_utils=FP8_INPUT_OPCHECKS)
            before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
            out = torch.ops.tessera.fp8_linear.default(*args)
            after = [a for a in args if isinstance(a, torch.Tensor)]
            for old, new in zip(before, after, strict=True):
                assert torch.equal(old.view(torch.uint8), new.view(torch.uint8))
            assert not any(out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in after)
    with pytest.raises(ValueError, match="unknown fp8 scheme"):
        fp8.fp8_linear(x, q, scale, "per_block")


@pytest.mark.parametrize("scheme", fp8.SCHEMES)
def test_fnuz_conversion_keeps_every_value(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n, k = SHAPES[scheme]
    q, scale = fp8.quantize_weight(_randn(n, k, seed=15), scheme, FN)
    q = q.view(torch.uint8).clone()
    q[0, :3] = torch.tensor([0x80, 0x7E, 0xFE], dtype=torch.uint8)  # -0, 448, -448
    q = q.view(FN)
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert fp8.fp8_dtype() == FNUZ and fp8.fp8_max() == 240
    qz, sz = fp8.for_platform(q, scale)
    assert qz.dtype == FNUZ and torch.equal(sz, scale * 2)
    before, after = fp8.dequantize_weight(q, scale, scheme), fp8.dequantize_weight(qz, sz, scheme)
    assert torch.equal(before, after) and not after.isnan().any()
    x = _randn(3, k, seed=16)
    xq, _ = fp8.quantize_act(x, fp8.act_group(scheme))
    assert xq.dtype == FNUZ and xq.float().abs().max() == 240  # activations use fnuz's max
    out = fp8.fp8_linear(x, qz, sz, scheme)
    assert rel_err(out, _linear_reference(x, qz, sz, scheme)) < 1e-6
    assert rel_err(out, x @ before.T) < 2**-3


@needs_kernels
@pytest.mark.parametrize("dtype", [FN, FNUZ])
@pytest.mark.parametrize("group", [0, 128])
def test_quant_kernel_matches_the_reference(group: int, dtype: torch.dtype) -> None:
    if DEVICE == "cuda" and dtype != fp8.fp8_dtype():
        pytest.skip("the GPU's own fp8 type only")
    x = _spread_rows(_randn(7, 300, seed=17, device=DEVICE))
    x[3] = 0
    q, s = fp8.fp8_kernels.quantize_act(x, group, dtype)
    rq, rs = fp8.quantize_act_reference(x.cpu(), group, dtype)
    assert torch.allclose(s.cpu(), rs, rtol=1e-6, atol=0)
    mismatched = (q.cpu().view(torch.uint8) != rq.view(torch.uint8)).float().mean().item()
    assert mismatched <= (0 if DEVICE == "cpu" else 1e-4)  # round to nearest even, as torch casts


@needs_kernels
@pytest.mark.parametrize("k", [384, 200])
@pytest.mark.parametrize("m", [1, 3, 16, 100])
def test_block_gemm_kernel_matches_the_reference(m: int, k: int) -> None:
    n = 200
    q, scale = fp8.quantize_weight(_randn(n, k, seed=18, device=DEVICE), "block")
    x, bias = _randn(m, k, seed=19, device=DEVICE), _randn(n, seed=20, device=DEVICE)
    xq, xs = fp8.fp8_kernels.quantize_act(x, 128, q.dtype)
    ref = fp8.dequantize_act(xq, xs, 128) @ fp8.dequantize_weight(q, scale, "block").T + bias
    out = fp8.fp8_kernels.block_gemm(xq, xs, q, scale, bias, torch.float32)
    # exact fp8 products, float32 sums in another order; on Hopper the FP8 MMA adds within a K step at
    # less than float32's precision (measured on an H100 at M = 100: 1.2e-4)
    assert rel_err(out, ref) < (1e-5 if DEVICE == "cpu" else 5e-4)
    out_bf16 = fp8.fp8_kernels.block_gemm(xq, xs, q, scale, None, torch.bfloat16)
    assert rel_err(out_bf16, ref - bias) < 2**-8
    if m > 4:  # rows 1 and 4 poisoned; every other row bit-identical
        pq, ps = fp8.fp8_kernels.quantize_act(_poison(x), 128, q.dtype)
        out_p = fp8.fp8_kernels.block_gemm(pq, ps, q, scale, bias, torch.float32)
        keep = [i for i in range(m) if i not in (1, 4)]
        assert torch.equal(out_p[keep], out[keep])


_GPU_WEIGHTS: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _gpu_weight(scheme: str, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if (scheme, n, k) not in _GPU_WEIGHTS:
        _GPU_WEIGHTS.clear()  # one at a time: 14336 x 4096 float32 is 235 MB
        q, scale = fp8.quantize_weight(_randn(n, k, seed=21, device="cuda"), scheme)
        _GPU_WEIGHTS[scheme, n, k] = (q, scale, fp8.dequantize_weight(q, scale, scheme))
    return _GPU_WEIGHTS[scheme, n, k]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("scheme", fp8.SCHEMES)
@pytest.mark.parametrize("m", [1, 8, 64, 512, 2048])
def test_gpu_paths_match_the_reference(m: int, scheme: str, n: int, k: int) -> None:
    q, scale, w = _gpu_weight(scheme, n, k)
    x = _randn(m, k, seed=22, device="cuda").bfloat16()
    path = "triton_block" if scheme == "block" else "scaled_mm"
    if m <= fp8.gemv_kernels.MAX_ROWS and fp8.gemv_kernels.fp8_tuned(x.device, scheme, n, k):
        path = "gemv"  # decode sizes this card's table has: the weight-streaming GEMM
    before = fp8.path_counts[path]
    out = fp8.fp8_linear(x, q, scale, scheme)
    assert fp8.path_counts[path] == before + 1, f"{scheme} did not take the {path} path"
    group = fp8.act_group(scheme)
    ref = fp8.dequantize_act(*fp8.quantize_act(x, group), group) @ w.T
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 4e-3  # bfloat16 output: 2^-9 per element
