"""Triton GEMMs over MXFP4 weights that dequantize in their K loop: dense (`mxfp4_matmul`) and grouped by
expert (`mxfp4_grouped_gemm`, for `mxfp4_moe`). The weights stay 4-bit in memory; each tile of W is
decoded to the activations' dtype in registers right before its `tl.dot`, so a decode step reads 0.27x
the bytes of a bf16 GEMM.

Decoding an e2m1 code (sign s, exponent e, mantissa m) without a lookup table: e = 0 is 0.5 * m, else
(1 + 0.5 * m) * 2^(e - 1), built as float32 bits ((e + 126) << 23 | m << 22). Scales 2^(s - 127) are
float32 bits s << 23 (s = 0, 2^-127, decodes as 0: only ever the scale of an all-zero block).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tessera.layers.kernel_launch import cdiv, next_pow2

# NOTE: equal to mxfp4.BLOCK_SIZE; not imported from there, which imports this module
GROUP = 32
# NOTE: a kernel may read a global only if it is a tl.constexpr (the interpreter allows any: CI missed it)
KGROUP = tl.constexpr(GROUP)
# NOTE: Triton's interpreter (3.9) multiplies bfloat16 tiles as their raw uint16 bits; there the kernels
# upcast both operands to float32 first, which is exact and what the GPU's bf16 MMA accumulates anyway
_DOT_IN_F32 = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true")


@triton.jit
def _e2m1_to_f32(code):
    em = code & 7
    e = em >> 1
    m = em & 1
    bits = tl.where(e > 0, ((e + 126) << 23) | (m << 22), m * (126 << 23))
    mag = bits.to(tl.float32, bitcast=True)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _dequant_tile(Wb, Ws, offs_n, n_ok, kg0, n_groups, stride_bn, stride_sn,
                  GROUPS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """W[offs_n, 32*kg0 : 32*(kg0 + GROUPS)] as float32 [BLOCK_N, 32 * GROUPS] (zero where masked)."""
    kg = kg0 + tl.arange(0, GROUPS)
    byte = tl.arange(0, KGROUP // 2)
    ok = n_ok[:, None] & (kg[None, :] < n_groups)  # [BLOCK_N, GROUPS]
    packed = tl.load(Wb + offs_n[:, None, None] * stride_bn + kg[None, :, None] * (KGROUP // 2)
                     + byte[None, None, :], mask=ok[:, :, None], other=0).to(tl.int32)  # fmt: skip
    # low nibble = even element: join puts it first along the new minor axis
    codes = tl.reshape(tl.join(packed & 0x0F, packed >> 4), [BLOCK_N, GROUPS, KGROUP])
    s = tl.load(Ws + offs_n[:, None] * stride_sn + kg[None, :], mask=ok, other=0).to(tl.int32)
    scale = (s << 23).to(tl.float32, bitcast=True)
    return tl.reshape(_e2m1_to_f32(codes) * scale[:, :, None], [BLOCK_N, GROUPS * KGROUP])


@triton.jit
def _mxfp4_matmul_kernel(
    X, Wb, Ws, Bias, Out, M, N, K, stride_xm, stride_bn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = sum_k X[m, k] * W[n, k] (+ Bias[n]) for one [BLOCK_M, BLOCK_N] tile."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, GROUPS * KGROUP):
        offs_k = k0 + tl.arange(0, GROUPS * KGROUP)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)  # fmt: skip
        if DOT_IN_F32:
            x = x.to(tl.float32)
        w = _dequant_tile(
            Wb, Ws, offs_n, n_ok, k0 // KGROUP, K // KGROUP, stride_bn, stride_sn, GROUPS, BLOCK_N
        )
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int  # a multiple of 32: whole scale groups
    num_warps: int
    num_stages: int


# NOTE: untuned starting points (no GPU was at hand when written). Decode (few rows) is bound by reading
# W: narrow N tiles give more programs to spread the weight over the SMs, a long K step amortizes each
# tile's scale loads. Prefill is bound by the dot: square-ish tiles reuse each decoded W tile across
# BLOCK_M rows.
SMALL_M = TileConfig(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=3)
TILED = TileConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
SMALL_M_MAX_ROWS = 16


def config_for(m: int) -> TileConfig:
    """The tile configuration the dense GEMM uses for M rows."""
    return SMALL_M if m <= SMALL_M_MAX_ROWS else TILED


def _block_k(cfg: TileConfig, k: int) -> int:
    return min(cfg.block_k, max(GROUP, next_pow2(k)))


def mxfp4_matmul(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in x's dtype; W [N, K] as blocks [N, K/2], scales [N, K/32]."""
    m, k = x.shape
    n = blocks.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config_for(m)
    block_n = min(cfg.block_n, max(16, next_pow2(n)))
    block_k = _block_k(cfg, k)
    _mxfp4_matmul_kernel[(cdiv(m, cfg.block_m), cdiv(n, block_n))](
        x, blocks, scales, bias if bias is not None else x, out, m, n, k,
        x.stride(0), blocks.stride(0), scales.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=block_n, GROUPS=block_k // GROUP,
        DOT_IN_F32=_DOT_IN_F32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


@triton.jit
def _dequant_kernel(Wb, Ws, Out, N, K, stride_bn, stride_sn, stride_on,
                    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    """Out[n, k] = W[n, k] for one [BLOCK_N, 32 * GROUPS] tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    kg0 = tl.program_id(1) * GROUPS
    w = _dequant_tile(Wb, Ws, offs_n, n_ok, kg0, K // KGROUP, stride_bn, stride_sn, GROUPS, BLOCK_N)
    offs_k = kg0 * KGROUP + tl.arange(0, GROUPS * KGROUP)
    tl.store(Out + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w.to(Out.dtype.element_ty),
             mask=n_ok[:, None] & (offs_k[None, :] < K))  # fmt: skip


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` from blocks [N, K/2] and scales [N, K/32] (exact: e2m1 times a power of two
    fits bf16 and float16 wherever the result is finite)."""
    n, k = blocks.shape[0], blocks.shape[1] * 2
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=blocks.device)
    if n == 0:
        return out
    block_n, groups = 32, min(8, next_pow2(k // GROUP))
    _dequant_kernel[(cdiv(n, block_n), cdiv(k // GROUP, groups))](
        blocks, scales, out, n, k, blocks.stride(0), scales.stride(0), out.stride(0),
        BLOCK_N=block_n, GROUPS=groups,
    )  # fmt: skip
    return out


@triton.jit
def _mxfp4_grouped_kernel(
    A, Wb, Ws, C, pair_of_slot, expert_of_block, scale, n_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_se, stride_sn, stride_cm,
    GATHER_TOKENS: tl.constexpr, TOPK: tl.constexpr, APPLY_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, DOT_IN_F32: tl.constexpr,
):  # fmt: skip
    """C[pair, n] = A[row(pair)] @ W[expert].T for the BLOCK_M pairs of one block of `fused_moe`'s layout
    (row = pair // TOPK when gathering token rows, else the pair); blocks of expert -1 exit at once."""
    block = tl.program_id(0)
    expert = tl.load(expert_of_block + block)
    if expert < 0:
        return
    pairs = tl.load(pair_of_slot + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < n_pairs
    rows = pairs // TOPK if GATHER_TOKENS else pairs
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    wb, ws = Wb + expert * stride_be, Ws + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, GROUPS * KGROUP):
        offs_k = k0 + tl.arange(0, GROUPS * KGROUP)
        a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)  # fmt: skip
        if DOT_IN_F32:
            a = a.to(tl.float32)
        w = _dequant_tile(
            wb, ws, offs_n, n_ok, k0 // KGROUP, K // KGROUP, stride_bn, stride_sn, GROUPS, BLOCK_N
        )
        acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    if APPLY_SCALE:
        acc *= tl.load(scale + pairs, mask=valid, other=0.0)[:, None]
    tl.store(C + pairs[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])  # fmt: skip


def mxfp4_grouped_gemm(
    a: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    c: torch.Tensor,
    layout: tuple[torch.Tensor, torch.Tensor, int],
    pair_weights: torch.Tensor | None,
    topk: int,
    gather: bool,
) -> None:
    """c[pair] = a[row(pair)] @ W[e(pair)].T (times pair_weights[pair] if given) for every laid-out pair;
    W [E, N, K] as blocks [E, N, K/2], scales [E, N, K/32]; `layout` = (pair_of_slot, expert_of_block,
    BLOCK_M) from `tessera.layers.fused_moe._layout`. Rows of pairs never laid out are left untouched."""
    pair_of_slot, expert_of_block, block_m = layout
    n, k = blocks.shape[1], blocks.shape[2] * 2
    block_n = min(64, max(16, next_pow2(n)))
    block_k = min(128, max(GROUP, next_pow2(k)))
    _mxfp4_grouped_kernel[(expert_of_block.numel(), cdiv(n, block_n))](
        a, blocks, scales, c, pair_of_slot, expert_of_block,
        pair_weights if pair_weights is not None else a, c.shape[0], n, k,
        a.stride(0), blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), c.stride(0),
        GATHER_TOKENS=gather, TOPK=topk, APPLY_SCALE=pair_weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, GROUPS=block_k // GROUP, DOT_IN_F32=_DOT_IN_F32,
    )  # fmt: skip
