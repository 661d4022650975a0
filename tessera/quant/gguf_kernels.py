"""Triton GEMMs y = x @ W.T with W a GGUF block-quantized `GGUFWeight` (layouts: `tessera.quant.gguf`).

Each K-tile of W is dequantized in registers, bit-exactly as the torch reference does it in float32, as
two half tiles: the values held by the low nibbles of a tile of bytes and those held by the high ones
(for Q8_0 simply the first and second half of the tile). Each half multiplies the matching columns of x,
gathered by index, so nibbles are never shuffled into place.

- M <= SMALL_M (decode): one program per (BLOCK_N rows of W, slice of K) holds all M rows of x; products
  in float32 summed in registers, no tensor cores. Every byte of W is read once. Too few N-blocks to fill
  the GPU split K; the slices' float32 partials are summed in a fixed order (no atomics: deterministic).
- larger M: tiles [BLOCK_M, BLOCK_N] through `tl.dot`, the dequantized W tile cast to x's dtype (float32
  x stays in IEEE float32, no TF32).

Rows of y depend only on their own row of x (no shared activation scale), so padding rows holding
garbage never change the other rows' bits.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from tessera.layers.kernel_launch import cdiv, next_pow2
from tessera.quant.gguf import GGUFWeight

SMALL_M = 8  # the largest M the decode kernel takes: beyond it tensor cores beat float32 FMAs
BLOCK_K = 128  # values of a K-tile: one Q6_K half block, so every format's nibble runs fit whole
# NOTE: Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits; there both operands go to
# float32 after W's rounding to x's dtype: exact, and what the GPU's bf16 MMA accumulates anyway
_DOT_IN_F32 = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true")


@triton.jit
def _k_scale_min(S, base, sub):
    """Q4_K's 6-bit (scale, min) of sub-block `sub` (0-7) of the 12 bytes at S + base, as float32."""
    low = sub < 4
    a = tl.load(S + base + sub).to(tl.int32)  # sub < 4: its scale; else the mins' top bits source
    b = tl.load(S + base + sub + 4).to(tl.int32)  # sub < 4: its min; else the low 4 bits of both
    c = tl.load(S + base + (sub % 4)).to(tl.int32)  # sub >= 4: the scale's top 2 bits (bits 6-7)
    sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dequant(P0, P1, P2, P3, rows, c, lo, hi, ok_lo, ok_hi, K, TYPE: tl.constexpr):
    """(W[rows, lo], W[rows, hi]) in float32; `c` the byte of the nibbles of both (4-bit types). Index
    tensors broadcast against each other, so one function serves [BN, BK/2] and [BK/2, BN] tiles."""
    if TYPE == 0:  # Q8_0: P0 qs, P1 d
        d_lo = tl.load(P1 + rows * (K // 32) + lo // 32, mask=ok_lo, other=0.0).to(tl.float32)
        d_hi = tl.load(P1 + rows * (K // 32) + hi // 32, mask=ok_hi, other=0.0).to(tl.float32)
        w_lo = tl.load(P0 + rows * K + lo, mask=ok_lo, other=0).to(tl.float32) * d_lo
        w_hi = tl.load(P0 + rows * K + hi, mask=ok_hi, other=0).to(tl.float32) * d_hi
    elif TYPE == 1 or TYPE == 2:  # Q4_0 / Q4_1: P0 qs, P1 d (, P2 m); lo and hi share a block
        b = tl.load(P0 + rows * (K // 2) + c, mask=ok_lo, other=0).to(tl.int32)
        d = tl.load(P1 + rows * (K // 32) + lo // 32, mask=ok_lo, other=0.0).to(tl.float32)
        if TYPE == 1:
            w_lo = d * ((b & 15) - 8).to(tl.float32)
            w_hi = d * ((b >> 4) - 8).to(tl.float32)
        else:
            m = tl.load(P2 + rows * (K // 32) + lo // 32, mask=ok_lo, other=0.0).to(tl.float32)
            w_lo = d * (b & 15).to(tl.float32) + m
            w_hi = d * (b >> 4).to(tl.float32) + m
    elif TYPE == 3:  # Q4_K: P0 qs, P1 d, P2 dmin, P3 scales; hi is in the sub-block after lo's
        b = tl.load(P0 + rows * (K // 2) + c, mask=ok_lo, other=0).to(tl.int32)
        blk = rows * (K // 256) + lo // 256
        d = tl.load(P1 + blk, mask=ok_lo, other=0.0).to(tl.float32)
        dmin = tl.load(P2 + blk, mask=ok_lo, other=0.0).to(tl.float32)
        base = tl.where(ok_lo, blk * 12, 0)
        sub = (lo % 256) // 32
        sc_lo, mn_lo = _k_scale_min(P3, base, sub)
        sc_hi, mn_hi = _k_scale_min(P3, base, sub + 1)
        w_lo = (d * sc_lo) * (b & 15).to(tl.float32) - dmin * mn_lo
        w_hi = (d * sc_hi) * (b >> 4).to(tl.float32) - dmin * mn_hi
    else:  # Q6_K: P0 ql, P1 qh, P2 scales, P3 d
        ql = tl.load(P0 + rows * (K // 2) + c, mask=ok_lo, other=0).to(tl.int32)
        j = c % 64  # lo = 128 * (c // 64) + j: its high bits sit in qh byte j % 32 of the half block
        qh = tl.load(P1 + rows * (K // 4) + (c // 64) * 32 + j % 32, mask=ok_lo, other=0).to(tl.int32)
        shift = (j // 32) * 2
        d = tl.load(P3 + rows * (K // 256) + lo // 256, mask=ok_lo, other=0.0).to(tl.float32)
        sc_lo = tl.load(P2 + rows * (K // 16) + lo // 16, mask=ok_lo, other=0).to(tl.float32)
        sc_hi = tl.load(P2 + rows * (K // 16) + hi // 16, mask=ok_lo, other=0).to(tl.float32)
        q_lo = ((ql & 15) | (((qh >> shift) & 3) << 4)) - 32
        q_hi = ((ql >> 4) | (((qh >> (shift + 4)) & 3) << 4)) - 32
        w_lo = (d * sc_lo) * q_lo.to(tl.float32)
        w_hi = (d * sc_hi) * q_hi.to(tl.float32)
    return w_lo, w_hi


@triton.jit
def _tile_columns(k0, K, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """(c, lo, hi) of the K-tile at k0: byte c holds the values at columns lo and hi = lo + G."""
    c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    lo = (c // G) * (2 * G) + c % G
    return c, lo, lo + G


@triton.jit
def _gguf_gemv_kernel(
    X, P0, P1, P2, P3, Y, M, N, K, stride_xm, k_split,
    TYPE: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Y[split] [M, N] = x[:, slice] @ W[:, slice].T for K slice `split` (program_id 1) of k_split."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]  # [BN, 1]: int64, N * K overflows int32 for large vocabularies
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    x_rows = X + offs_m[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = tl.program_id(1) * k_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_split, K), BLOCK_K):
        c, lo, hi = _tile_columns(k0, K, G, BLOCK_K)
        lo_ok, hi_ok = lo < K, hi < K
        ok_lo, ok_hi = n_ok[:, None] & lo_ok[None, :], n_ok[:, None] & hi_ok[None, :]
        w_lo, w_hi = _dequant(
            P0, P1, P2, P3, rows, c[None, :], lo[None, :], hi[None, :], ok_lo, ok_hi, K, TYPE
        )
        x_lo = tl.load(x_rows + lo[None, :], mask=m_ok[:, None] & lo_ok[None, :], other=0.0).to(tl.float32)
        x_hi = tl.load(x_rows + hi[None, :], mask=m_ok[:, None] & hi_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x_lo[:, None, :] * w_lo[None, :, :], axis=2)  # [BM, BN, BK/2] -> [BM, BN]
        acc += tl.sum(x_hi[:, None, :] * w_hi[None, :, :], axis=2)
    out = Y + tl.program_id(1) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gguf_gemm_kernel(
    X, P0, P1, P2, P3, Y, M, N, K, stride_xm, stride_ym,
    TYPE: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):  # fmt: skip
    # NOTE: "ieee" keeps float32 x out of TF32 (bf16 / fp16 operands ignore it).
    # NOTE: M-blocks are the fast grid axis, so programs running together share a W tile through L2.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    rows = offs_n.to(tl.int64)[None, :]  # [1, BN]: W.T tiles [BK/2, BN] for tl.dot
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c, lo, hi = _tile_columns(k0, K, G, BLOCK_K)
        lo_ok, hi_ok = lo < K, hi < K
        ok_lo, ok_hi = lo_ok[:, None] & n_ok[None, :], hi_ok[:, None] & n_ok[None, :]
        w_lo, w_hi = _dequant(
            P0, P1, P2, P3, rows, c[:, None], lo[:, None], hi[:, None], ok_lo, ok_hi, K, TYPE
        )
        x_lo = tl.load(x_rows + lo[None, :], mask=m_ok[:, None] & lo_ok[None, :], other=0.0)
        x_hi = tl.load(x_rows + hi[None, :], mask=m_ok[:, None] & hi_ok[None, :], other=0.0)
        w_lo, w_hi = w_lo.to(X.dtype.element_ty), w_hi.to(X.dtype.element_ty)
        if DOT_IN_F32:
            x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
            w_lo, w_hi = w_lo.to(tl.float32), w_hi.to(tl.float32)
        acc = tl.dot(x_lo, w_lo, acc, input_precision="ieee")
        acc = tl.dot(x_hi, w_hi, acc, input_precision="ieee")
    out = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter (CPU tests): a few "SMs", so tests exercise split K
    return torch.cuda.get_device_properties(device).multi_processor_count


def _group(w: GGUFWeight) -> int:
    return w.format.group or BLOCK_K // 2  # Q8_0: the tile's halves are its two contiguous halves


def _split_k(n_blocks: int, k: int, device: torch.device) -> int:
    """K slices for the decode kernel: enough programs for two waves, each slice whole K-tiles."""
    tiles = cdiv(k, BLOCK_K)
    splits = max(1, min(tiles, cdiv(2 * _sm_count(device), n_blocks)))
    return cdiv(tiles, cdiv(tiles, splits))  # no empty slice


def _gemv(x: torch.Tensor, w: GGUFWeight, split_k: int | None) -> torch.Tensor:
    (m, k), n = x.shape, w.shape[0]
    block_m = next_pow2(m)
    block_n = min(64, max(8, 128 // block_m))  # keeps the [BM, BN, BK/2] product at 8K floats
    n_blocks = cdiv(n, block_n)
    splits = split_k or _split_k(n_blocks, k, x.device)
    k_split = cdiv(cdiv(k, BLOCK_K), splits) * BLOCK_K
    splits = cdiv(k, k_split)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    p = (*w.parts, *w.parts[:1] * (4 - len(w.parts)))  # unused pointer slots: any tensor
    _gguf_gemv_kernel[(n_blocks, splits)](
        x, *p, out, m, n, k, x.stride(0), k_split,
        TYPE=w.format.code, G=_group(w), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=4,
    )  # fmt: skip
    if splits > 1:
        y.copy_(out.sum(0))
    return y


def _gemm(x: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
    (m, k), n = x.shape, w.shape[0]
    block_m = min(128, max(16, next_pow2(m)))
    block_n = 64
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    p = (*w.parts, *w.parts[:1] * (4 - len(w.parts)))
    _gguf_gemm_kernel[(cdiv(m, block_m), cdiv(n, block_n))](
        x, *p, y, m, n, k, x.stride(0), y.stride(0),
        TYPE=w.format.code, G=_group(w), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
        DOT_IN_F32=_DOT_IN_F32, num_warps=8 if block_m >= 128 else 4,
    )  # fmt: skip
    return y


def gguf_matmul(x: torch.Tensor, w: GGUFWeight, *, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or fp32) @ W.T -> [M, N] in x's dtype, accumulated in float32. M <= SMALL_M
    takes the decode kernel (`split_k` forces its number of K slices), larger M the tiled one."""
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns, the weight {w.shape[1]}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[0]))
    return _gemv(x, w, split_k) if x.shape[0] <= SMALL_M else _gemm(x, w)
