"""MoE experts with MXFP4 weights: `tessera::mxfp4_moe_experts`, the MXFP4 twin of `tessera::moe_experts`.

Experts in HF's fused layout, each quantized along its last (input) dim: gate_up [E, 2I, H] as w13_blocks
[E, 2I, H/2] + w13_scales [E, 2I, H/32], down [E, H, I] as w2_blocks [E, H, I/2] + w2_scales [E, H, I/32].
out[t] = sum_k weight[t, k] * down_e(SiLU(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, k].

Pairs with `topk_ids = -1` (padded rows) are skipped entirely: no FLOPs, their x rows are never read (a
NaN there reaches nothing) and their output rows are zero. On CUDA the experts run as two Triton grouped
GEMMs over `fused_moe`'s device-side layout, W dequantized in their K loops (capture-safe: no host sync).
Elsewhere the reference loop, which dequantizes only the experts that got tokens, one at a time.
"""

from __future__ import annotations

import torch

from tessera.graphs import opaque_op
from tessera.layers.expert_format import expert_loop
from tessera.quant.mxfp4 import dequantize

try:
    from tessera.layers.fused import silu_mul
    from tessera.layers.fused_moe import BLOCK_M, _layout
    from tessera.quant import mxfp4_kernels
except ImportError:  # no Triton: the reference loop everywhere
    mxfp4_kernels = None  # type: ignore[assignment]


def reference_experts(
    x: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The experts as a loop (per-expert token counts come back to the host: not capturable)."""

    def weights_of(e: int) -> tuple[torch.Tensor, torch.Tensor]:  # [2I, H], [H, I] in x's dtype
        w13 = dequantize(w13_blocks[e], w13_scales[e], x.dtype)
        return w13, dequantize(w2_blocks[e], w2_scales[e], x.dtype)

    return expert_loop(x, weights_of, w13_blocks.shape[0], topk_weights, topk_ids)


def triton_experts(
    x: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The experts as two Triton grouped GEMMs with in-loop dequantize (capture-safe)."""
    if mxfp4_kernels is None:
        raise RuntimeError("the MXFP4 Triton experts need Triton")
    tokens, topk = topk_ids.shape
    num_experts, two_i = w13_blocks.shape[:2]
    hidden = w2_blocks.shape[1]
    n_pairs = tokens * topk
    pair_of_slot, expert_of_block = _layout(topk_ids, num_experts)
    if n_pairs == 0 or expert_of_block.numel() == 0:
        return torch.zeros_like(x)
    layout = (pair_of_slot, expert_of_block, BLOCK_M)
    x = x if x.stride(-1) == 1 else x.contiguous()
    h = torch.zeros(n_pairs, two_i, dtype=x.dtype, device=x.device)  # [pairs, 2I]
    mxfp4_kernels.mxfp4_grouped_gemm(x, w13_blocks, w13_scales, h, layout, None, topk, gather=True)
    act = silu_mul(h)  # [pairs, I]
    y = torch.zeros(n_pairs, hidden, dtype=x.dtype, device=x.device)  # [pairs, H]; padded pairs stay 0
    pair_weights = topk_weights.flatten().to(torch.float32)
    mxfp4_kernels.mxfp4_grouped_gemm(act, w2_blocks, w2_scales, y, layout, pair_weights, topk, gather=False)
    return y.view(tokens, topk, hidden).sum(1, dtype=torch.float32).to(x.dtype)


def _experts_fake(
    x: torch.Tensor, w13_blocks: torch.Tensor, w13_scales: torch.Tensor, w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    return torch.empty_like(x)


@opaque_op("tessera::mxfp4_moe_experts", fake=_experts_fake)
def mxfp4_moe_experts(
    x: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """x [T, H] through the top-k MXFP4 experts of each row -> [T, H] in x's dtype (an opaque op: Dynamo
    keeps it whole). topk_weights float [T, K], topk_ids int [T, K] (-1: skipped)."""
    args = (x, w13_blocks, w13_scales, w2_blocks, w2_scales, topk_weights, topk_ids)
    if x.is_cuda and mxfp4_kernels is not None:
        return triton_experts(*args)
    return reference_experts(*args)
