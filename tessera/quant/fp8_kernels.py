"""Triton kernels for FP8 W8A8: the activation quantizer (per token or per 1x128 group) and the 128x128
block-scaled GEMM (DeepSeek-V3 layout).

Both keep rows independent: a row's scale comes from that row only, and the GEMM's K loop multiplies a
tile's partial sums by the row's group scale, so a NaN or a huge value in a padded row never reaches a
real row's output. `tessera.quant.fp8` calls these on GPU tensors; CI runs them in Triton's interpreter.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tessera.graphs import is_hip
from tessera.layers.kernel_launch import cdiv, next_pow2

GROUP = 128  # block-scheme group: activations 1x128, weights 128x128
# NOTE: the interpreter's float32 -> fp8 cast rounds half up without carrying into the exponent
# (127.2 becomes 64), so under TRITON_INTERPRET the quantizer rounds onto the fp8 grid itself first and
# the cast is exact. Compiled kernels cast in hardware (round to nearest even).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true")


@triton.jit
def _round_to_fp8_grid(v, MIN_EXP: tl.constexpr):
    """v (float32, |v| <= the format's max) rounded to nearest even on the e4m3 grid, in float32: 3
    mantissa bits, and below the smallest normal 2^MIN_EXP the subnormals' fixed spacing."""
    exp = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased float32 exponent
    exp = tl.maximum(exp, MIN_EXP + 127)
    quantum = ((exp - 3) << 23).to(tl.float32, bitcast=True)  # spacing of the grid around v
    return ((v / quantum + 12582912.0) - 12582912.0) * quantum  # 1.5 * 2^23: float32 adds round to even


@triton.jit
def _quant_kernel(
    X, Q, S, K, group, stride_xm, stride_qm, stride_sm,
    FMAX: tl.constexpr, MIN_EXP: tl.constexpr, EXACT_CAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per (row, group): amax over the group, scale = amax / FMAX, q = x / scale."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    x_row = X + row * stride_xm + g * group
    q_row = Q + row * stride_qm + g * group
    limit = tl.minimum(group, K - g * group)  # the last group may be short
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, limit, BLOCK):
        x = tl.load(x_row + k0 + lanes, mask=k0 + lanes < limit, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FMAX  # an all-zero group quantizes to zeros
    tl.store(S + row * stride_sm + g, scale)
    for k0 in range(0, limit, BLOCK):
        mask = k0 + lanes < limit
        x = tl.load(x_row + k0 + lanes, mask=mask, other=0.0).to(tl.float32)
        v = tl.clamp(x / scale, -FMAX, FMAX, propagate_nan=tl.PropagateNan.ALL)
        if EXACT_CAST:
            v = _round_to_fp8_grid(v, MIN_EXP)
        tl.store(q_row + k0 + lanes, v.to(Q.dtype.element_ty), mask=mask)


def quantize_act(x: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] `dtype`, scale float32 [M, G]) for x [M, K]: G = 1 per token (group 0) or
    ceil(K / group) groups; x ~= q * scale of its group."""
    rows, k = x.shape
    group = group or k
    groups = cdiv(k, group)
    q = torch.empty((rows, k), dtype=dtype, device=x.device)
    scale = torch.empty((rows, groups), dtype=torch.float32, device=x.device)
    if rows == 0 or k == 0:
        return q, scale
    finfo = torch.finfo(dtype)
    _quant_kernel[(rows, groups)](
        x, q, scale, k, group, x.stride(0), q.stride(0), scale.stride(0),
        FMAX=finfo.max, MIN_EXP=int(math.log2(finfo.smallest_normal)), EXACT_CAST=_INTERPRET,
        BLOCK=min(1024, next_pow2(group)),
    )  # fmt: skip
    return q, scale


@triton.jit
def _block_gemm_kernel(
    A, AS, B, BS, C, Bias, M, N, K,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C = (A * AS) @ (B * BS).T with A fp8 [M, K] in 1xBLOCK_K groups of scale AS [M, K/BLOCK_K], B fp8
    [N, K] in BLOCK_K x BLOCK_K blocks of scale BS. BLOCK_N divides BLOCK_K, so a tile has one weight
    scale per K step; both scales multiply the tile's float32 partial product inside the K loop."""
    pid_m = tl.program_id(0)  # fastest: consecutive programs share the weight tile (read once from HBM)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = B + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BK, BN]
    as_ptrs = AS + offs_m * stride_asm
    bs_ptr = BS + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptr + kb)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def block_config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for M rows. Small M is weight-bandwidth bound: narrow
    N tiles give enough programs to cover the SMs; large M takes big tiles for reuse. Untuned guesses."""
    if m <= 16:
        cfg = (16, 64, 4, 5)
    elif m <= 64:
        cfg = (64, 64, 4, 4)
    elif m <= 256:
        cfg = (64, 128, 4, 3)
    else:
        cfg = (128, 128, 8, 3)
    # NOTE: MI300's LDS is 64 KiB and its pipeliner counts stages differently: two stages fit every tile
    return (*cfg[:3], 2) if is_hip() else cfg


def block_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[M, N] `out_dtype` = dequant(xq, x_scale [M, ceil(K/128)]) @ dequant(qweight, w_scale
    [ceil(N/128), ceil(K/128)]).T (+ bias), accumulated in float32."""
    m, k = xq.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    block_m, block_n, warps, stages = block_config(m)
    _block_gemm_kernel[(cdiv(m, block_m), cdiv(n, block_n))](
        xq, x_scale, qweight, w_scale, out, bias if bias is not None else out, m, n, k,
        xq.stride(0), x_scale.stride(0), qweight.stride(0), w_scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GROUP,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
