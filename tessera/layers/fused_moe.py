"""Experts as two grouped GEMMs in Triton, capture-safe: no host sync, every shape fixed by the batch size.

The (token, choice) pairs are sorted by expert on the device and laid out in blocks of BLOCK_M, each
expert's run padded to a whole block; a block knows its expert, or -1 past the last one. The worst-case
layout (T*K pairs plus BLOCK_M - 1 of padding per expert) fixes every tensor's size, so a CUDA graph can
capture the whole thing and a replay with other routing reuses it. Pairs with `topk_ids = -1` (padded
rows) are never placed in a block: no FLOPs, and their output rows stay zero.

1. gate_up:  h[pair] = x[token(pair)] @ W13[e].T      (blocks of pairs x tiles of 2I)
2. SiLU(gate) * up                                     (`tessera.layers.fused.silu_mul`)
3. down:     y[pair] = weight[pair] * (a[pair] @ W2[e].T)
4. out[token] = sum over its K pairs of y
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.layers.kernel_launch import cdiv, next_pow2

BLOCK_M = 16


@triton.jit
def _grouped_gemm_kernel(
    A, B, C, pair_of_slot, expert_of_block, scale,
    n_pairs, N, Kdim, stride_am, stride_be, stride_bn, stride_cm,
    GATHER_TOKENS: tl.constexpr, TOPK: tl.constexpr, APPLY_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[pair, n] = A[row(pair)] @ B[expert].T for the pairs of one block; row = pair // TOPK when
    gathering token rows (gate_up), else the pair itself (down)."""
    block = tl.program_id(0)
    expert = tl.load(expert_of_block + block)
    if expert < 0:
        return
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pair_of_slot + slots)
    valid = pairs < n_pairs
    rows = pairs // TOPK if GATHER_TOKENS else pairs
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, Kdim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < Kdim), other=0.0)  # fmt: skip
        b = tl.load(B + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < Kdim), other=0.0)  # fmt: skip
        acc += tl.dot(a, b)
    if APPLY_SCALE:
        acc *= tl.load(scale + pairs, mask=valid, other=0.0)[:, None]
    tl.store(C + pairs[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=valid[:, None] & (offs_n[None, :] < N))  # fmt: skip


def _layout(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair_of_slot [S], expert_of_block [S / BLOCK_M]) for the worst-case S; unused slots hold the
    sentinel n_pairs, unused blocks expert -1. Device ops only, no sync."""
    flat = ids.flatten()
    n_pairs, device = flat.numel(), flat.device
    bucket = torch.where(flat < 0, num_experts, flat)  # padded rows' pairs go to a bucket never laid out
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    counts = counts[:num_experts]
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = torch.cumsum(padded, 0) - padded  # each expert's first slot
    first = torch.cumsum(counts, 0) - counts  # each expert's first position in the sorted pairs
    sorted_bucket, order = torch.sort(bucket, stable=True)
    in_expert = sorted_bucket < num_experts
    e = sorted_bucket.clamp(max=num_experts - 1)
    rank = torch.arange(n_pairs, device=device) - first[e]
    size = n_pairs + num_experts * (BLOCK_M - 1)
    size = (size + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    dest = torch.where(in_expert, start[e] + rank, size)  # padded pairs land in a dropped extra slot
    pair_of_slot = torch.full((size + 1,), n_pairs, dtype=torch.long, device=device)
    pair_of_slot.scatter_(0, dest, order)
    block_begin = torch.arange(0, size, BLOCK_M, device=device)
    ends = torch.cumsum(padded, 0)
    expert_of_block = torch.searchsorted(ends, block_begin, right=True)
    expert_of_block = torch.where(expert_of_block < num_experts, expert_of_block, -1)
    return pair_of_slot[:size], expert_of_block


def fused_experts(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H]; gate_up [E, 2I, H]; down [E, H, I]; weights, ids [T, K] (id -1: skip) -> [T, H]."""
    from tessera.layers.fused import silu_mul

    tokens, topk = ids.shape
    num_experts, two_i, hidden = gate_up.shape
    pair_of_slot, expert_of_block = _layout(ids, num_experts)
    n_pairs, blocks = tokens * topk, expert_of_block.numel()
    h = torch.zeros(n_pairs, two_i, dtype=x.dtype, device=x.device)
    if blocks == 0 or n_pairs == 0:
        return torch.zeros_like(x)
    pair_weights = weights.flatten().to(torch.float32)

    def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, gather: bool, scale: bool) -> None:
        n, k = b.shape[1], b.shape[2]
        block_n = min(64, max(16, next_pow2(n)))
        block_k = min(64, max(16, next_pow2(k)))
        _grouped_gemm_kernel[(blocks, cdiv(n, block_n))](
            a, b, c, pair_of_slot, expert_of_block, pair_weights,
            n_pairs, n, k, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
            GATHER_TOKENS=gather, TOPK=topk, APPLY_SCALE=scale,
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        )  # fmt: skip

    gemm(x, gate_up, h, gather=True, scale=False)
    act = silu_mul(h)
    y = torch.zeros(n_pairs, hidden, dtype=x.dtype, device=x.device)
    gemm(act, down, y, gather=False, scale=True)
    return y.view(tokens, topk, hidden).sum(1, dtype=torch.float32).to(x.dtype)
