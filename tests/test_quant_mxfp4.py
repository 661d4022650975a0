"""MXFP4 weights: the format (e2m1 codes, e8m0 scales, nibble order against HF transformers), online
quantization and its error bounds, the dense op (CPU path and the Triton GEMM) and the MoE experts op
(reference loop and Triton grouped GEMMs), padded rows included. Triton runs in its interpreter here
(TRITON_INTERPRET=1, set by conftest without a GPU); on a GPU the same tests run the compiled kernels."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from tessera.quant import mxfp4, mxfp4_moe
from tessera.quant.mxfp4 import dequantize, from_checkpoint, mxfp4_linear, quantize

from .conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton, and on a CPU its interpreter (TRITON_INTERPRET=1)",
)
# dense GEMM against float32 dequantize-then-matmul, relative Frobenius error. float32 x: the CPU sums in
# another order (~1e-7); a GPU's float32 tl.dot runs in TF32 (x rounded to 10 mantissa bits: ~5e-4).
# bfloat16 x: the weights are exact in bf16 and products accumulate in float32, so only the output's
# rounding is left (2^-9 relative, up to 2^-8 where the interpreter truncates instead of rounding).
DENSE_TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 3e-3, torch.bfloat16: 8e-3}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _valid_mxfp4(
    n: int, k: int, seed: int, prefix: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed codes and scales in [0, 252] (higher ones overflow float32 at 6 * 2^(s-127)), each
    block's first value forced to +-6 so that requantizing its values must find the same scale."""
    gen = _gen(seed)
    blocks = torch.randint(0, 256, (*prefix, n, k // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 253, (*prefix, n, k // 32), generator=gen, dtype=torch.uint8)
    first = blocks[..., ::16]  # the byte holding each block's element 0 (low nibble)
    blocks[..., ::16] = (first & 0xF8) | 0x7  # code 7 (6.0) or 15 (-6.0), keeping the sign bit
    return blocks, scales


def _decode_e2m1(code: int) -> float:
    sign, exponent, mantissa = -1.0 if code & 8 else 1.0, (code >> 1) & 3, code & 1
    return sign * (0.5 * mantissa if exponent == 0 else (1 + 0.5 * mantissa) * 2.0 ** (exponent - 1))


def test_e2m1_table_and_e8m0_decode_are_exact() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes | codes << 4)[:, None].expand(16, 16)  # row c: code c in every nibble
    values = dequantize(blocks, torch.full((16, 1), 127, dtype=torch.uint8))  # scale 1
    for code in range(16):
        assert values[code].unique().tolist() == [_decode_e2m1(code)]
        assert torch.signbit(values[code]).all() == bool(code & 8)  # code 8 is -0.0
    assert [abs(v) for v in mxfp4.E2M1_VALUES[:8]] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    s = torch.arange(256, dtype=torch.uint8)
    decoded = mxfp4.e8m0_to_float(s)
    assert decoded[:255].double().tolist() == [2.0 ** (i - 127) for i in range(255)]  # 2^-127 subnormal
    assert decoded[255].isnan()


def test_dequantize_matches_transformers_checkpoint_decoding() -> None:
    """Nibble order and scale bias against HF's own gpt-oss decoding of checkpoint blocks [E, N, K/32, 16]
    (which also transposes to [E, K, N])."""
    hf = pytest.importorskip("transformers.integrations.mxfp4")
    blocks, scales = _valid_mxfp4(24, 64, seed=1, prefix=(3,))
    scales = scales.clamp(110, 140)  # within bf16 (HF's default dtype) without subnormals
    checkpoint = blocks.view(3, 24, 2, 16)
    ours = dequantize(*from_checkpoint(checkpoint, scales))
    theirs = hf.convert_moe_packed_tensors(checkpoint, scales, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="checkpoint"):
        from_checkpoint(blocks, scales)


def test_quantize_inverts_dequantize_on_valid_codes() -> None:
    blocks, scales = _valid_mxfp4(40, 256, seed=2)
    got_blocks, got_scales = quantize(dequantize(blocks, scales))
    assert torch.equal(got_scales, scales)
    assert torch.equal(got_blocks, blocks)  # -0.0 (code 8) included: the sign survives


def test_ties_round_to_even_codes() -> None:
    # scale 1 (the 6 fixes it); each midpoint between two e2m1 magnitudes goes to the even code
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    row = torch.tensor([6.0, *mids, *[-m for m in mids]] + [0.0] * 17)
    blocks, scales = quantize(row[None])
    codes = mxfp4.unpack_codes(blocks)[0, :15].tolist()
    assert scales.item() == 127
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantization_error_is_bounded(dtype: torch.dtype) -> None:
    """Rows spanning 12 orders of magnitude. Per block, 2^e is chosen so that amax / 2^e lies in (3, 6]:
    nothing saturates. Rounding to nearest then errs by at most half an e2m1 step, a quarter of the
    value's own power of two (steps 0.5 on [1, 2), 1 on [2, 4), 2 on [4, 6]) and a quarter of 2^e below
    1: |w - q(w)| <= max(|w|, 2^e) / 4."""
    w = torch.randn(64, 512, generator=_gen(3)) * torch.logspace(-6, 6, 64)[:, None]
    w = w.to(dtype)
    blocks, scales = quantize(w)
    step = mxfp4.e8m0_to_float(scales).repeat_interleave(32, -1)  # 2^e per element
    ref = w.float()
    amax = ref.abs().unflatten(-1, (-1, 32)).amax(-1)
    scaled = amax / mxfp4.e8m0_to_float(scales)
    assert (scaled > 3).all() and (scaled <= 6).all()
    err = (dequantize(blocks, scales) - ref).abs()
    assert (err <= torch.maximum(ref.abs(), step) / 4).all()
    # relative error of each Gaussian row (scale-free): measured mean 0.117, max 0.126 over 64 rows of 512;
    # a wrong nibble order pairs each value with its neighbour: uncorrelated, about sqrt(2)
    row_err = (dequantize(blocks, scales) - ref).norm(dim=1) / ref.norm(dim=1)
    assert row_err.mean() < 0.125 and row_err.max() < 0.15
    assert dequantize(blocks, scales, dtype).dtype == dtype


def test_k_must_be_a_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.randn(4, 48))
    with pytest.raises(ValueError, match="multiple"):
        mxfp4.packed_nbytes(4, 100)


def test_memory_is_17_64ths_of_bf16() -> None:
    n, k = 96, 256
    blocks, scales = quantize(torch.randn(n, k, generator=_gen(4)))
    nbytes = blocks.nbytes + scales.nbytes
    assert nbytes == mxfp4.packed_nbytes(n, k) == k * n // 2 + k * n // 32
    assert nbytes / (n * k * 2) == 17 / 64  # 0.266x of bf16


def _dense_case(n: int, k: int, m: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """x [M, K], blocks, scales, bias [N] and the float32 reference x @ W.T + bias."""
    blocks, scales = quantize(torch.randn(n, k, generator=_gen(seed)) * 0.05)
    x = torch.randn(m, k, generator=_gen(seed + 1)).to(dtype)
    bias = torch.randn(n, generator=_gen(seed + 2)).to(dtype)
    ref = F.linear(x.float(), dequantize(blocks, scales), bias.float())  # float32, on the CPU
    return x, blocks, scales, bias, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 100])
def test_dense_op_cpu_path(m: int, dtype: torch.dtype) -> None:
    x, blocks, scales, bias, ref = _dense_case(72, 256, m, dtype, seed=5)
    out = mxfp4_linear(x.view(1, m, 256), blocks, scales, bias)
    assert out.shape == (1, m, 72) and out.dtype == dtype
    assert rel_err(out[0], ref) < {torch.float32: 1e-6, torch.bfloat16: 5e-3}[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 100])  # 1-16: the small-M tiles; 100: the tiled ones
@pytest.mark.parametrize(("n", "k"), [(48, 64), (48, 256), (72, 64), (72, 256), (48, 96)])  # 96: masked K
def test_triton_dense_gemm_matches_dequantize_then_matmul(n: int, k: int, m: int, dtype: torch.dtype) -> None:
    from tessera.quant import mxfp4_kernels

    x, blocks, scales, bias, ref = _dense_case(n, k, m, dtype, seed=n + k)
    args = (t.to(DEVICE) for t in (x, blocks, scales))
    out = mxfp4_kernels.mxfp4_matmul(*args, bias.to(DEVICE) if m == 3 else None)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), ref if m == 3 else ref - bias.float()) < DENSE_TOL[dtype]


@needs_triton
@pytest.mark.parametrize(("n", "k"), [(48, 64), (72, 96), (40, 512)])  # 96: a partial tile; 40: rows masked
def test_triton_dequantize_is_exact(n: int, k: int) -> None:
    from tessera.quant import mxfp4_kernels

    blocks, scales = _valid_mxfp4(n, k, seed=n + k)
    scales.clamp_(100, 150)  # within bf16's range, so the bf16 result is exact too
    ref = dequantize(blocks, scales)
    for dtype in (torch.float32, torch.bfloat16):
        out = mxfp4_kernels.dequantize(blocks.to(DEVICE), scales.to(DEVICE), dtype)
        assert out.dtype == dtype and torch.equal(out.float().cpu(), ref)


def _dense_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """float32 experts pair by pair: out[t] += w * down_e(SiLU(gate_e(x[t])) * up_e(x[t]))."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t, k in (ids >= 0).nonzero().tolist():
        e = ids[t, k]
        gate, up = (w13[e] @ x[t].float()).chunk(2)
        out[t] += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


E, H, INTER = 4, 64, 32


def _moe_case(tokens: int, topk: int, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    """x, w13 blocks and scales, w2 blocks and scales, routing weights and ids."""
    gen = _gen(seed)
    w13 = quantize(torch.randn(E, 2 * INTER, H, generator=gen) / H**0.5)
    w2 = quantize(torch.randn(E, H, INTER, generator=gen) / INTER**0.5)
    ids = torch.stack([torch.randperm(E, generator=gen)[:topk] for _ in range(tokens)])
    weights = torch.rand(tokens, topk, generator=gen)
    x = torch.randn(tokens, H, generator=gen)
    return [t.to(device) for t in (x, *w13, *w2, weights, ids)]


MOE_BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


def _experts(backend: str) -> Callable[..., torch.Tensor]:
    return mxfp4_moe.reference_experts if backend == "reference" else mxfp4_moe.triton_experts


@pytest.mark.parametrize("backend", MOE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "topk"), [(13, 2), (1, 1), (24, 3)])
def test_moe_experts_match_the_dequantized_reference(
    backend: str, dtype: torch.dtype, tokens: int, topk: int
) -> None:
    device = "cpu" if backend == "reference" else DEVICE
    x, b13, s13, b2, s2, weights, ids = _moe_case(tokens, topk, seed=tokens, device=device)
    ref = _dense_experts(
        x.cpu(), dequantize(b13, s13).cpu(), dequantize(b2, s2).cpu(), weights.cpu(), ids.cpu()
    )
    out = _experts(backend)(x.to(dtype), b13, s13, b2, s2, weights, ids)
    assert out.dtype == dtype
    # bf16: rounded at the gate_up output, SiLU, the product and the down output (truncated by the
    # interpreter: measured 0.015); float32: summation order (and TF32 on a GPU)
    tol = {torch.float32: 1e-5 if device == "cpu" else 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert rel_err(out.cpu(), ref) < tol


@pytest.mark.parametrize("backend", MOE_BACKENDS)
def test_moe_padded_rows_are_skipped_and_never_reach_real_rows(backend: str) -> None:
    device = "cpu" if backend == "reference" else DEVICE
    x, b13, s13, b2, s2, weights, ids = _moe_case(16, 2, seed=7, device=device)
    real = 11
    alone = _experts(backend)(x[:real], b13, s13, b2, s2, weights[:real], ids[:real])
    x[real:], ids[real:], weights[real:] = float("nan"), -1, 0.0  # padded up to a capture size
    out = _experts(backend)(x, b13, s13, b2, s2, weights, ids)
    assert torch.equal(out[:real], alone)  # bit-identical: the padded rows changed nothing
    assert (out[real:] == 0).all()  # and no expert computed them
    assert alone.abs().sum() > 0


def test_opcheck_both_ops() -> None:
    x, blocks, scales, bias, _ = _dense_case(48, 64, 5, torch.float32, seed=8)
    torch.library.opcheck(torch.ops.tessera.mxfp4_linear.default, (x, blocks, scales, bias))
    torch.library.opcheck(torch.ops.tessera.mxfp4_linear.default, (x, blocks, scales))
    x, b13, s13, b2, s2, weights, ids = _moe_case(6, 2, seed=9)
    ids[-1] = -1
    torch.library.opcheck(torch.ops.tessera.mxfp4_moe_experts.default, (x, b13, s13, b2, s2, weights, ids))


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 8, 64, 512, 2048])
def test_dense_op_at_llama_shapes(n: int, k: int, m: int) -> None:
    blocks, scales = quantize(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(m, k, device="cuda").bfloat16()
    ref = x.float() @ dequantize(blocks, scales).T
    out = mxfp4_linear(x, blocks, scales)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 8e-3


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 512])
def test_moe_op_at_deepseek_v2_lite_shape(tokens: int) -> None:
    experts, hidden, inter, topk = 64, 2048, 1408, 6
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    w13 = quantize(torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) / hidden**0.5)
    w2 = quantize(torch.randn(experts, hidden, inter, device="cuda", generator=gen) / inter**0.5)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen)
    ids = torch.rand(tokens, experts, device="cuda", generator=gen).topk(topk, -1)[1]
    weights = torch.rand(tokens, topk, device="cuda", generator=gen)
    ids[tokens // 2 + 1 :], weights[tokens // 2 + 1 :] = -1, 0.0  # the tail padded
    out = torch.ops.tessera.mxfp4_moe_experts(x.bfloat16(), *w13, *w2, weights, ids)
    ref = mxfp4_moe.reference_experts(x, *w13, *w2, weights, ids)  # float32, dequantized per expert
    assert rel_err(out, ref) < 2e-2
    assert (out[tokens // 2 + 1 :] == 0).all()
