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
import torch.nn.functional as F
from torch import nn

from tessera.distributed.state import ep_rank, ep_size, tp_rank, tp_size
from tessera.graphs import opaque_op
from tessera.layers.grouped_mm_moe import grouped_mm_experts
from tessera.layers.linear import Loaded, materialize

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


class Experts(nn.Module):
    """E SwiGLU experts in HF's fused layout; `forward(x, topk_weights, topk_ids)` -> [T, H], this rank's
    share of the sum over experts (the MoE block all-reduces it, once, with its shared experts').

    Over TP ranks, with ep == 1 every rank holds every expert with the intermediate dim split as a dense
    MLP's (gate_up rows [gate_r; up_r], down columns r); with ep == tp rank r holds experts
    [r*E/ep, (r+1)*E/ep) whole, and choices of other experts are skipped here as padded rows' are."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        ep = ep_size()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.num_local_experts = _divide(num_experts, ep, "num_experts", "EP")
        self.expert_start = ep_rank() * self.num_local_experts
        split = tp_size() if ep == 1 else 1
        self.local_intermediate = _divide(intermediate_size, split, "moe intermediate_size", "TP")
        self.intermediate_start = (tp_rank() if ep == 1 else 0) * self.local_intermediate
        experts, inter = self.num_local_experts, self.local_intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden_size, inter))
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.backend = "auto"  # one of EXPERT_BACKENDS; the model runner sets it from its config
        self._loaded: set[tuple[str, int | None, int | None]] = set()  # (param, expert, part)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.num_local_experts != self.num_experts:
            local = topk_ids - self.expert_start
            topk_ids = local.masked_fill((local < 0) | (local >= self.num_local_experts), -1)
        return torch.ops.tessera.moe_experts(
            x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, self.backend
        )

    @torch.no_grad()
    def weight_loader(
        self, param: nn.Parameter, loaded: Loaded, shard_id: tuple[int, int | None] | None = None
    ) -> None:
        """Copy this rank's part of a checkpoint tensor into `param`: HF's fused tensor of every expert
        ([E, 2I, H] or [E, H, I]) when `shard_id` is None, else expert e's `(e, part)` (part 0/1: its gate
        or up [I, H]; None: its down [H, I]). Experts of other ranks are skipped, never read."""
        name = "gate_up_proj" if param is self.gate_up_proj else "down_proj"
        if param is not getattr(self, name):
            raise ValueError("the tensor passed to weight_loader is no parameter of these experts")
        if shard_id is None:
            mine = loaded.narrow(0, self.expert_start, self.num_local_experts)
            self._load_expert(name, param, mine, None, offset=1)
            self._loaded.add((name, None, None))
            return
        expert, part = shard_id
        local = expert - self.expert_start
        if not 0 <= local < self.num_local_experts:
            return
        self._load_expert(name, param[local], loaded, part, offset=0)
        self._loaded.add((name, expert, part))

    def _load_expert(self, name: str, dst: torch.Tensor, src: Loaded, part: int | None, offset: int) -> None:
        """dst/src: one expert's (offset 0) or every local expert's (offset 1, a leading expert dim)."""
        start, inter = self.intermediate_start, self.local_intermediate
        if name == "down_proj":  # [.., H, I]: this rank's columns
            _copy(dst, src.narrow(offset + 1, start, inter))
            return
        parts = (0, 1) if part is None else (part,)
        for p in parts:  # [.., 2I, H]: gate rows then up rows, each split on its own
            piece = src.narrow(offset, start + (self.intermediate_size if part is None and p else 0), inter)
            _copy(dst.narrow(offset, p * inter, inter), piece)

    def missing_shards(self) -> list[str]:
        """Parameters some local expert's tensor was not loaded into."""
        experts = range(self.expert_start, self.expert_start + self.num_local_experts)
        missing = []
        for name, parts in (("gate_up_proj", (0, 1)), ("down_proj", (None,))):
            wanted = {(name, e, p) for e in experts for p in parts}
            if (name, None, None) not in self._loaded and not wanted <= self._loaded:
                missing.append(name)
        return missing


def _copy(dst: torch.Tensor, src: Loaded) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}")
    dst.copy_(materialize(src))


def _divide(n: int, world: int, what: str, kind: str) -> int:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the {kind} size {world}")
    return n // world


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
    out = torch.zeros_like(x)
    flat = ids.flatten()
    # tokens grouped by expert; id -1 (padded rows) sorts first and is cut off, never computed
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat + 1, minlength=gate_up.shape[0] + 1).tolist()
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if count == 0:
            continue
        picks = order[start : start + count]
        start += count
        rows = picks // ids.shape[1]
        gate, up = F.linear(x[rows], gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[expert])
        out.index_add_(0, rows, (y * weights.flatten()[picks, None]).to(out.dtype))
    return out
