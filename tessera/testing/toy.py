"""A toy transformer stack for tests, examples and benchmarks: per layer RMSNorm, fused QKV projection,
causal attention over one sequence as a split op, output projection, RMSNorm and a SwiGLU MLP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tessera.graphs import current_forward_context, split_op

try:
    from tessera.testing.toy_attention import CausalAttention, causal_attention
except ImportError:  # no Triton: torch's attention everywhere
    CausalAttention = causal_attention = None  # type: ignore[assignment,misc]


@split_op("tessera_toy::attention", outputs=("out",), zeroes_padding=True)
def toy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer_id: int
) -> None:
    """Causal attention over the real tokens of one sequence, zeros on the padded rows after them.
    q, k, v, out: [T, H, D]."""
    ctx = current_forward_context()
    n = ctx.raw_num_tokens if ctx is not None else q.shape[0]
    if q.is_cuda and causal_attention is not None:
        causal_attention(q, k, v, out, n)  # one launch, padded rows included
        return
    o = F.scaled_dot_product_attention(
        q[:n].transpose(0, 1), k[:n].transpose(0, 1), v[:n].transpose(0, 1), is_causal=True
    )  # [H, n, D]
    out[:n].copy_(o.transpose(0, 1))
    out[n:].zero_()


@toy_attention.binder
def _bind(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer_id: int
) -> Callable[[], None] | None:
    """A graph replay's attention: the Triton launch bound to the captured buffers once (None off CUDA)."""
    if not (q.is_cuda and CausalAttention is not None):
        return None
    attend = CausalAttention(q, k, v, out)
    return lambda: attend(current_forward_context().raw_num_tokens)  # type: ignore[union-attr]


@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    num_heads: int = 4
    intermediate_size: int = 128
    num_layers: int = 2
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig, layer_id: int) -> None:
        super().__init__()
        self.config, self.layer_id = cfg, layer_id
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.norm1, self.norm2 = RMSNorm(h, cfg.eps), RMSNorm(h, cfg.eps)
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.o = nn.Linear(h, h, bias=False)
        self.gate_up = nn.Linear(h, 2 * i, bias=False)
        self.down = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        t, cfg = x.shape[0], self.config
        qkv = self.qkv(self.norm1(x)).view(t, 3, cfg.num_heads, cfg.head_dim)
        attn = torch.empty(t, cfg.num_heads, cfg.head_dim, dtype=x.dtype, device=x.device)
        torch.ops.tessera_toy.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], attn, self.layer_id)
        x = x + self.o(attn.view(t, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class ToyModel(nn.Module):
    """`forward(input_ids [T]) -> hidden states [T, hidden]`."""

    def __init__(self, cfg: ToyConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or ToyConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(ToyBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
