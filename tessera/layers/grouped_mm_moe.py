"""Experts as two `torch._grouped_mm` calls (PyTorch's grouped GEMM: CUTLASS on Hopper), capture-safe.

The alternative to the Triton grouped GEMMs of `fused_moe.py` that issue #5 asks to measure against them
(`python -m benchmarks.moe_padding --experts`): (token, choice) pairs sorted by expert on the device, one GEMM
over all experts' runs for gate_up and one for down, cut by `offs` (each expert's end row, on the device:
no host sync). Pairs of padded rows (`topk_ids = -1`) sort after every expert's run, past the last
offset: no expert computes them, and their rows are masked to zero before the sum over choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_experts(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H]; gate_up [E, 2I, H]; down [E, H, I]; weights, ids [T, K] (id -1: skip) -> [T, H]."""
    tokens, topk = ids.shape
    num_experts, hidden = gate_up.shape[0], x.shape[1]
    flat = ids.flatten()
    bucket = torch.where(flat < 0, num_experts, flat)  # padded pairs: a bucket past every expert
    order = torch.sort(bucket, stable=True)[1]
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket, dtype=torch.int32))
    offs = torch.cumsum(counts[:num_experts], 0, dtype=torch.int32)  # each expert's end row
    rows = x[order // topk]  # [T*K, H], grouped by expert
    # NOTE: the weights in PyTorch's [E, N, K] layout, passed transposed: what _grouped_mm wants
    h = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # [T*K, H]
    valid = (bucket[order] < num_experts)[:, None]  # rows past the last offset are never written
    y = torch.where(valid, y.float() * weights.flatten().float()[order, None], 0.0)
    pairs = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, choice) order
    return pairs.view(tokens, topk, hidden).sum(1).to(x.dtype)
