"""The sparse MLP of Mixtral / Qwen3-MoE / DeepSeek layers: a router, routed experts and DeepSeek's
shared experts, named as HF's blocks (`gate`, `experts`, `shared_experts`).

Over TP ranks the router is whole on every rank (each routes every token alike), the experts hold this
rank's share (`tessera.layers.moe.Experts`: the intermediate dim split with ep == 1, whole experts with
ep == tp) and the shared experts are a TP-split MLP. Each part yields a partial sum, reduced once for the
block. Padded rows are routed nowhere (`tessera.layers.moe.route`), so they add nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.distributed.comm import all_reduce, all_reduce_placement
from tessera.layers.expert_format import experts_method_at
from tessera.layers.linear import MethodFor, child_name
from tessera.layers.moe import Experts, RoutingConfig, route
from tessera.model_config import ModelConfig
from tessera.models.mlp import GatedMLP


class Router(nn.Module):
    """Router weights (and DeepSeek-V3's score-correction bias), named as HF's `gate`; whole on every
    rank and never quantized."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool, fp32: bool = False) -> None:
        super().__init__()
        self.fp32 = fp32  # logits in float32 whatever the model's dtype: near-ties route as HF's do
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if correction_bias:  # a parameter, not a buffer, so checkpoints load it like any weight
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float()) if self.fp32 else F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str = "", method_for: MethodFor | None = None) -> None:
        """`prefix`: the block's HF module name ("model.layers.1.mlp"), for `method_for`."""
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.routing = RoutingConfig(
            top_k=moe.top_k, scoring=moe.scoring, renormalize=moe.renormalize, num_groups=moe.num_groups,
            topk_groups=moe.topk_groups, group_score=moe.group_score,
            routed_scaling_factor=moe.routed_scaling_factor,
        )  # fmt: skip
        self.gate = Router(
            cfg.hidden_size, moe.num_experts, correction_bias=moe.scoring == "sigmoid", fp32=moe.router_fp32
        )
        method = experts_method_at(method_for, prefix)
        self.experts = Experts(moe.num_experts, cfg.hidden_size, moe.intermediate_size, method)
        if moe.shared_experts:
            self.shared_experts = GatedMLP(
                cfg, child_name(prefix, "shared_experts"), method_for,
                intermediate_size=moe.intermediate_size * moe.shared_experts, reduce_results=False,
            )  # fmt: skip
        self.placement = all_reduce_placement()  # NOTE: read once, at build: the graphs are cut by it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.gate, "e_score_correction_bias", None)
        out = self.experts(x, *route(self.gate(x), self.routing, bias))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return all_reduce(out, self.placement)  # one rank: `out` itself
