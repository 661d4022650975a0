from __future__ import annotations

import torch
from torch import nn

try:
    from tessera.layers import fused
except ImportError:  # no Triton (a CPU-only install): the torch reference runs
    fused = None  # type: ignore[assignment]


class RMSNorm(nn.Module):
    """RMSNorm; `forward(x, residual)` adds the residual first and returns (normed, sum), the add fused
    into the norm's kernel on a GPU."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused is not None and x.is_cuda and x.dim() == 2 and x.stride(-1) == 1:
            if residual is None:
                return torch.ops.tessera.rms_norm(x, self.weight, self.eps)
            return torch.ops.tessera.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._reference(x)
        summed = x + residual
        return self._reference(summed), summed

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalise in float32 as HF does; the weight multiplies after casting back.
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)
