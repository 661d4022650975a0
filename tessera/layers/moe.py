"""Mixture-of-experts: routing (router logits -> `topk_weights`, `topk_ids`) and the experts, with padded
rows masked out.

Under piecewise graphs a batch is padded up to a capture size. A padded row's hidden state is whatever
the static buffer held (garbage, or NaN in the poison test); routed like a real token it would cost
expert FLOPs and, through a NaN in a shared expert's GEMM tile or an index_add, could reach real rows.
So rows at or beyond the forward context's `raw_num_tokens` get `topk_ids = -1` and weight 0, and the
expert computation skips id -1 entirely: no FLOPs, no contribution.

Routing follows HF transformers: Mixtral / Qwen-MoE (softmax over experts, top-k, optional
renormalisation) and DeepSeek-V2 / V3 (softmax or sigmoid scores, V3's correction bias used for the
choice only, group-limited top-k, routed scaling factor). Expert weights use HF's fused layout:
`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]. On CUDA the experts run as Triton grouped GEMMs
(`fused_moe.py`) or as `torch._grouped_mm` (`grouped_mm_moe.py`), both capture-safe; elsewhere the
reference loop here unless grouped_mm is asked for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from tessera.graphs import opaque_op
from tessera.layers.expert_format import ExpertShape, ExpertsMethod, expert_loop
from tessera.layers.grouped_mm_moe import grouped_mm_experts
from tessera.layers.linear import Loaded

try:
    from tessera.layers import fused_moe
except ImportError:  # no Triton: the reference loop everywhere
    fused_moe = None  # type: ignore[assignment]

# CUDA graphs can capture the experts only through the Triton grouped GEMMs (the reference loop syncs)
CAPTURE_SAFE_ON_CUDA = fused_moe is not None


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    scoring: str = "softmax"  # "softmax" (Mixtral, Qwen-MoE, DeepSeek-V2) or "sigmoid" (DeepSeek-V3)
    renormalize: bool = True  # divide the chosen weights by their sum
    num_groups: int = 1  # group-limited routing: experts in `num_groups` groups ...
    topk_groups: int = 1  # ... of which the best `topk_groups` are eligible, a group scored by
    group_score: str = "max"  # its best expert (DeepSeek-V2) or "top2_sum" of its best two (V3)
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown MoE scoring {self.scoring!r}: softmax or sigmoid")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"unknown group score {self.group_score!r}: max or top2_sum")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"topk_groups must be in [1, num_groups], got {self.topk_groups}/{self.num_groups}"
            )


def route(
    router_logits: torch.Tensor, cfg: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights float32 [T, K], topk_ids int64 [T, K]) from router logits [T, E]. Padded rows
    (`tessera::padded_rows`: past the forward context's real rows, recomputed on the device at every
    graph replay) get id -1 and weight 0."""
    logits = router_logits.float()
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_groups > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, cfg.num_groups, experts // cfg.num_groups)
        group_score = grouped.topk(2, -1)[0].sum(-1) if cfg.group_score == "top2_sum" else grouped.amax(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(cfg.topk_groups, -1, sorted=False)[1], True)
        choice = choice.masked_fill(~keep.repeat_interleave(experts // cfg.num_groups, 1), float("-inf"))
    ids = choice.topk(cfg.top_k, -1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    padded = torch.ops.tessera.padded_rows(router_logits)[:, None]
    return weights.masked_fill(padded, 0.0), ids.masked_fill(padded, -1)


# "auto": on a GPU, the Triton grouped GEMMs for small batches and torch._grouped_mm (bfloat16 on Hopper
# or sm100) for large ones, the reference loop elsewhere; "triton", "grouped_mm": one of them always
# (capture-safe: Triton always, grouped_mm where `grouped_mm_capture_safe`)
EXPERT_BACKENDS = ("auto", "triton", "grouped_mm")

# NOTE: from `python -m benchmarks.moe_padding` (GPU time, graph replays, H200; benchmarks/results/
# moe_padding_h200.json): the Triton kernels win while experts get few rows each (DeepSeek-V2-Lite at 16
# and 129 tokens: 1.5 and 12 (token, choice) rows an expert on average; Qwen3-30B-A3B at 16-520: up to
# 33), torch._grouped_mm from 49 on (DeepSeek at 520 and 2048, Qwen3 at 2048: up to 1.7x faster)
GROUPED_MM_MIN_ROWS_PER_EXPERT = 40


@functools.cache
def _cutlass_grouped_mm(device: torch.device) -> bool:
    """Whether torch._grouped_mm has its CUTLASS kernels on this CUDA device (sm90 and sm100)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] in (9, 10)


def grouped_mm_capture_safe(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the grouped_mm experts can be captured in a CUDA graph here. NOTE: torch._grouped_mm runs
    its CUTLASS kernels for bfloat16 on sm90/sm100 only; any other dtype (float32 MoE models) or GPU takes
    its fallback, a loop over the groups that reads their offsets on the host (`offs.cpu()`): a sync no
    graph can capture, which failed every float32 MoE model's start-up."""
    return device.type != "cuda" or (dtype == torch.bfloat16 and _cutlass_grouped_mm(device))


class UnquantizedExpertsMethod(ExpertsMethod):
    """Experts in the model's dtype, computed by `tessera::moe_experts` with the layer's `backend`."""

    def create_weights(self, layer: nn.Module, shape: ExpertShape, dtype: torch.dtype) -> None:
        self._register_online(layer, shape, dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return torch.ops.tessera.moe_experts(
            x, layer.gate_up_proj, layer.down_proj, topk_weights, topk_ids, layer.backend
        )

    def dequantize(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.gate_up_proj.float(), layer.down_proj.float()


class Experts(nn.Module):
    """E SwiGLU experts in HF's fused layout; `forward(x, topk_weights, topk_ids)` -> [T, H], this rank's
    share of the sum over experts (the MoE block all-reduces it, once, with its shared experts').

    Over TP ranks, with ep == 1 every rank holds every expert with the intermediate dim split as a dense
    MLP's (gate_up rows [gate_r; up_r], down columns r); with ep == tp rank r holds experts
    [r*E/ep, (r+1)*E/ep) whole, and choices of other experts are skipped here as padded rows' are.
    `method`: the weights' format (`tessera.layers.expert_format`; None: the model's dtype)."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, method: ExpertsMethod | None = None
    ) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.expert_shape = ExpertShape.for_rank(num_experts, hidden_size, intermediate_size)
        self.method = method or UnquantizedExpertsMethod()
        self.method.create_weights(self, self.expert_shape, torch.get_default_dtype())
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.backend = "auto"  # one of EXPERT_BACKENDS; the model runner sets it from its config
        self._loaded: set[tuple[str, int | None, int | None]] = set()  # (param, expert, part)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        shape = self.expert_shape
        if shape.num_experts != self.num_experts:  # expert parallelism: this rank's, by local id
            local = topk_ids - shape.first_expert
            topk_ids = local.masked_fill((local < 0) | (local >= shape.num_experts), -1)
        return self.method.apply(self, x, topk_weights, topk_ids)

    @torch.no_grad()
    def weight_loader(
        self, param: nn.Parameter, loaded: Loaded, shard_id: tuple[int, int | None] | None = None
    ) -> None:
        """Copy this rank's part of a checkpoint tensor into `param`: HF's fused tensor of every expert
        ([E, 2I, H] or [E, H, I], or the format's own) when `shard_id` is None, else expert e's `(e, part)`
        (part 0/1: its gate or up; None: its down). Experts of other ranks are skipped, never read."""
        name = next((n for n, p in self.named_parameters(recurse=False) if p is param), None)
        if name is None:
            raise ValueError("the tensor passed to weight_loader is no parameter of these experts")
        expert, part = shard_id if shard_id is not None else (None, None)
        if self.method.load(self, name, loaded, expert, part):
            self._loaded.add((name, expert, part))

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def missing_shards(self) -> list[str]:
        """Parameters some local expert's tensor was not loaded into."""
        shape = self.expert_shape
        experts = range(shape.first_expert, shape.first_expert + shape.num_experts)
        missing = []
        for name, _ in self.named_parameters(recurse=False):
            parts = (0, 1) if self.expert_specs[name].gate_up else (None,)
            wanted = {(name, e, p) for e in experts for p in parts}
            if (name, None, None) not in self._loaded and not wanted <= self._loaded:
                missing.append(name)
        return missing


def _experts_fake(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:  # fmt: skip
    return torch.empty_like(x)


@opaque_op("tessera::moe_experts", fake=_experts_fake)
def moe_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """The experts (an opaque op: Dynamo keeps it whole). On CUDA: the Triton grouped GEMMs of
    `fused_moe`, or `torch._grouped_mm` ("auto": for large batches on Hopper); both capture-safe.
    Elsewhere by default: the reference loop, whose per-expert token counts come back to the host (so
    no CUDA graph could capture it)."""
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}: one of {', '.join(EXPERT_BACKENDS)}")
    if backend == "auto" and x.is_cuda and ids.numel() >= GROUPED_MM_MIN_ROWS_PER_EXPERT * gate_up.shape[0]:
        backend = "grouped_mm" if grouped_mm_capture_safe(gate_up.dtype, x.device) else backend
    if backend == "grouped_mm":
        return grouped_mm_experts(x, gate_up, down, weights, ids)
    if backend == "triton" and (fused_moe is None or not x.is_cuda):
        raise RuntimeError("the triton MoE backend needs Triton and a GPU; use auto or grouped_mm")
    if x.is_cuda and fused_moe is not None:
        return fused_moe.fused_experts(x, gate_up, down, weights, ids)
    return expert_loop(x, lambda e: (gate_up[e], down[e]), gate_up.shape[0], weights, ids)
