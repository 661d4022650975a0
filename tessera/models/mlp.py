"""The dense SwiGLU MLP: gate and up fused into one column-parallel GEMM, down row-parallel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.layers.linear import MergedColumnParallelLinear, MethodFor, RowParallelLinear, method_at
from tessera.layers.norm import fused as fused_kernels
from tessera.model_config import ModelConfig


class GatedMLP(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        prefix: str = "",
        method_for: MethodFor | None = None,
        *,
        intermediate_size: int | None = None,
        reduce_results: bool = True,
    ) -> None:
        """`prefix`: the MLP's HF module name ("model.layers.0.mlp"), for `method_for`.
        `reduce_results=False`: return this rank's partial sum (a MoE block reduces it with its experts')."""
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [inter, inter], bias=False, method=method_at(method_for, prefix, "gate_up_proj")
        )
        self.down_proj = RowParallelLinear(
            inter, cfg.hidden_size, bias=False, reduce_results=reduce_results,
            method=method_at(method_for, prefix, "down_proj"),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * I / tp]: this rank's gate, then its up
        if fused_kernels is not None and gate_up.is_cuda:
            return self.down_proj(torch.ops.tessera.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
