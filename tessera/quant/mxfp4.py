"""MXFP4 (OCP Microscaling FP4) weights: the format, quantize / dequantize references, the dense op.

A weight [..., N, K] is quantized along K in blocks of 32 consecutive values. Each value is e2m1 (4 bits:
sign, 2 exponent bits, 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), each block shares one e8m0
scale (a uint8 s meaning 2^(s - 127); 255 is NaN). Layout, as in the gpt-oss / HF transformers checkpoints
(and AMD Quark's DeepSeek-R1 MXFP4) once their `*_blocks` [..., N, K/32, 16] are flattened:

* `blocks` uint8 [..., N, K/2]: two values a byte, the **low nibble holds the even element** (k = 2j),
  the high nibble the odd one (k = 2j + 1);
* `scales` uint8 [..., N, K/32]: the e8m0 exponent of each block.

So a matrix costs K*N/2 + K*N/32 bytes: 17/64 (0.27x) of bf16. Activations stay in their dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.graphs import opaque_op

try:
    from tessera.quant import gemv_kernels, mxfp4_kernels
except ImportError:  # no Triton: dequantize-then-matmul everywhere
    gemv_kernels = mxfp4_kernels = None  # type: ignore[assignment]

BLOCK_SIZE = 32  # values sharing one scale
E8M0_BIAS = 127
E8M0_NAN = 255
# e2m1 code -> value; codes 8..15 are the negatives of 0..7 (code 8 is -0.0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
# magnitudes halfway between neighbouring e2m1 codes 0..7: the rounding boundaries
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _check_k(k: int) -> None:
    if k % BLOCK_SIZE:
        raise ValueError(f"MXFP4 quantizes along K in blocks of {BLOCK_SIZE}: K = {k} is not a multiple")


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent exactly, float32, for integer exponents in [-149, 127] (subnormals below -126), built
    from the bits: exp2 / ldexp on some backends round or flush the extremes."""
    e = exponent.to(torch.int32)
    normal = ((e + 127).clamp(min=1) << 23).view(torch.float32)
    subnormal = (torch.ones_like(e) << (e + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(e >= -126, normal, subnormal)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """float32 2^(s - 127) of uint8 e8m0 scales (s = 255: NaN)."""
    s = scales.to(torch.int32)
    return torch.where(s == E8M0_NAN, float("nan"), pow2(s - E8M0_BIAS))


def _block_exponents(amax: torch.Tensor) -> torch.Tensor:
    """The smallest e with amax / 2^e <= 6, per block (int32; 0 for all-zero blocks), clamped to e8m0.

    NOTE: from frexp, not log2(amax / 6): dividing by 6 rounds, and a block whose amax is a power of two
    times 6 would get a scale one step too large. With amax = m * 2^x (m in [0.5, 1)), amax / 2^(x-3) =
    8m lies in [4, 8): within 6 when m <= 0.75, else one more step."""
    m, x = torch.frexp(amax)
    e = x - 3 + (m > 0.75).to(x.dtype)
    e = torch.where(amax > 0, e, 0)
    return e.clamp(-E8M0_BIAS, E8M0_BIAS).to(torch.int32)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8 0..15) of float32 v (already scaled into [-6, 6]), round to nearest, ties to even
    (the even code: mantissa bit 0), as OCP specifies for conversions."""
    mids = torch.tensor(_MIDPOINTS, dtype=v.dtype, device=v.device)
    a = v.abs()
    down = torch.bucketize(a, mids, right=False)  # a tie goes to the lower code ...
    up = torch.bucketize(a, mids, right=True)  # ... or the upper one; they differ only at ties
    code = torch.where(down % 2 == 1, up, down)
    return (code | torch.signbit(v).to(code.dtype) << 3).to(torch.uint8)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., N, K/2], scales uint8 [..., N, K/32]) of w [..., N, K] (any float dtype).

    Each block of 32 along K gets the power-of-two scale that puts its amax within e2m1's range (amax /
    scale in (3, 6]: nothing saturates); values round to the nearest e2m1, ties to even. Blocks whose
    amax is below 3 * 2^-127 flush their smallest values to zero (the scale cannot go lower)."""
    _check_k(w.shape[-1])
    groups = w.float().unflatten(-1, (-1, BLOCK_SIZE))  # [..., N, K/32, 32]
    e = _block_exponents(groups.abs().amax(-1))  # [..., N, K/32]
    codes = _round_e2m1(groups * pow2(-e)[..., None]).flatten(-2)  # exact: a power-of-two multiply
    blocks = codes[..., 0::2] | codes[..., 1::2] << 4
    return blocks, (e + E8M0_BIAS).to(torch.uint8)


def unpack_codes(blocks: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 [..., N, K] of packed blocks [..., N, K/2] (low nibble first)."""
    return torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w [..., N, K] in `dtype` from (blocks [..., N, K/2], scales [..., N, K/32]). Exact in float32 and,
    but for values below bfloat16's normal range, in bfloat16 too (e2m1 needs one mantissa bit)."""
    if blocks.shape[:-1] != scales.shape[:-1] or blocks.shape[-1] != scales.shape[-1] * BLOCK_SIZE // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = table[unpack_codes(blocks).long()].unflatten(-1, (-1, BLOCK_SIZE))  # [..., N, K/32, 32]
    return (values * e8m0_to_float(scales)[..., None]).flatten(-2).to(dtype)


def from_checkpoint(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [..., N, K/2], scales [..., N, K/32]) from a gpt-oss / HF checkpoint's `*_blocks` uint8
    [..., N, K/32, 16] and `*_scales` uint8 [..., N, K/32]: the same bytes, nibble order unchanged."""
    if blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"checkpoint MXFP4 blocks {tuple(blocks.shape)} should be scales {tuple(scales.shape)} + (16,)"
        )
    return blocks.to(torch.uint8).flatten(-2).contiguous(), scales.to(torch.uint8).contiguous()


def packed_nbytes(n: int, k: int) -> int:
    """Bytes of one [N, K] matrix in MXFP4: K*N/2 of values plus K*N/32 of scales."""
    _check_k(k)
    return n * k // 2 + n * k // BLOCK_SIZE


def _linear_fake(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return x.new_empty((x.shape[0], blocks.shape[0]))


@opaque_op("tessera::mxfp4_linear", fake=_linear_fake)
def _mxfp4_linear_op(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in x's dtype, W [N, K] in MXFP4. CUDA: up to
    `gemv_kernels.MAX_ROWS` rows the weight-streaming decode GEMM, which dequantizes in its K loop; more
    rows, and elsewhere: W dequantized for this call only, so memory keeps 4 bits."""
    if x.is_cuda and mxfp4_kernels is not None:
        if x.shape[0] <= gemv_kernels.MAX_ROWS and gemv_kernels.usable(x.device, "mxfp4"):
            return gemv_kernels.mxfp4_gemv(x, blocks, scales, bias)
        # NOTE: past decode sizes, one dequantizing pass (a transient copy of W in x's dtype) and cuBLAS
        # beat the tiled GEMM that decodes in its K loop (`benchmarks.decode_gemm --rows 64 512` times both)
        return F.linear(x, mxfp4_kernels.dequantize(blocks, scales, x.dtype), bias)
    return F.linear(x, dequantize(blocks, scales, x.dtype), bias)


def mxfp4_linear(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, W, bias)` for x [..., K] and W [N, K] in MXFP4 (blocks [N, K/2], scales [N, K/32])."""
    if x.shape[-1] != blocks.shape[-1] * 2:
        raise ValueError(f"x's last dim {x.shape[-1]} != the MXFP4 weight's K {blocks.shape[-1] * 2}")
    out = torch.ops.tessera.mxfp4_linear(x.reshape(-1, x.shape[-1]), blocks, scales, bias)
    return out.view(*x.shape[:-1], blocks.shape[0])
