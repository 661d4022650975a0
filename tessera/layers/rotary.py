"""Rotary position embedding (HF's rotate-half layout) with default, linear, llama3 and yarn scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

try:
    from tessera.layers import fused
except ImportError:  # no Triton (a CPU-only install): the torch reference runs
    fused = None  # type: ignore[assignment]


def rope_parameters(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], factor on cos and sin) for a scaling scheme."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv.float(), 1.0
    if kind == "linear":
        return (inv / scaling["factor"]).float(), 1.0
    if kind == "llama3":
        return _llama3(inv, scaling).float(), 1.0
    if kind == "yarn":
        return _yarn(inv, head_dim, theta, scaling, max_positions)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3, yarn")


def _yarn(
    inv: torch.Tensor, dim: int, theta: float, s: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    """YaRN: high frequencies extrapolate, low ones interpolate by `factor`, with a linear ramp between
    the correction dims of `beta_fast` / `beta_slow` rotations; cos and sin scale by an attention factor."""
    original = s.get("original_max_position_embeddings") or max_positions
    # NOTE: as HF transformers 5: without a factor, the ratio of the two context lengths (DeepSeek-V3)
    factor = s.get("factor") or max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    mixed = inv / factor * (1 - extrapolate) + inv * extrapolate
    return mixed.float(), float(attention)


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(is_mid, mid, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        theta: float,
        max_positions: int,
        scaling: dict[str, Any] | None,
        interleaved: bool = False,
    ):
        """`interleaved`: rotate pairs (x0, x1), (x2, x3), ... (DeepSeek's layout) instead of the two
        halves; the output is in the halves layout either way (q and k alike, so q.k is unchanged)."""
        super().__init__()
        self.interleaved = interleaved
        inv, attention = rope_parameters(head_dim, theta, scaling, max_positions)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)  # [P, D/2]
        # NOTE: in the model's dtype (the default one while it is built), as a cast of the model would
        dtype = torch.get_default_dtype()
        self.register_buffer("cos", (freqs.cos() * attention).to(dtype), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attention).to(dtype), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.interleaved:  # pairs to halves first (a copy), the layout the rotation below takes
            q, k = _deinterleave(q), _deinterleave(k)
        if fused is not None and q.is_cuda and not self.interleaved:
            return torch.ops.tessera.rope(q, k, self.cos, self.sin, positions)
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
