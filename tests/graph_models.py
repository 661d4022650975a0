"""Small models and ops that the graph-runtime tests share."""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from tessera.graphs import get_forward_context, split_op
from tessera.testing.toy import ToyConfig, ToyModel

TINY = ToyConfig(vocab_size=128, hidden_size=32, num_heads=2, intermediate_size=64, num_layers=3)

# What the recording op saw on its last calls: (num_tokens, raw, metadata, layer objects, gc enabled).
SEEN: list[tuple[int, int, Any, Any, Any, bool]] = []


@split_op("tessera_test::record", outputs=("out",))
def record(x: torch.Tensor, out: torch.Tensor, layer_id: int) -> None:
    ctx = get_forward_context()
    SEEN.append(
        (
            ctx.num_tokens,
            ctx.raw_num_tokens,
            ctx.metadata,
            ctx.layer(layer_id, "mha"),
            ctx.layer(layer_id, "mqa"),
            gc.isenabled(),
        )
    )
    out.copy_(x * 2)


class Recorder(nn.Module):
    """One layer whose split op looks up both roles of an MLA-like layer in the context."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        out = torch.empty_like(h)
        torch.ops.tessera_test.record(h, out, 0)
        return out + 1


@split_op("tessera_test::scaled_copy", outputs=("out",))
def scaled_copy(x: torch.Tensor, out: torch.Tensor) -> None:
    """Writes every row, padded ones included: the runtime must zero those afterwards."""
    out.copy_(x * 3)


class SumsAllRows(nn.Module):
    """Returns a sum over *all* rows (not token-indexed, so never sliced): padded rows of the split
    op's output (`scaled_copy`'s, or `op`'s: (x, out)) show up in it unless the runtime zeroed them."""

    def __init__(self, op: Any = None) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.op = op if op is not None else torch.ops.tessera_test.scaled_copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + 1.0
        out = torch.empty_like(h)
        self.op(h, out)
        return out.sum(dim=0, keepdim=True)


# How often the bound op was bound and how often a call went through its binder's callable.
BINDS: dict[str, int] = {"binds": 0, "bound_calls": 0, "plain_calls": 0}


@split_op("tessera_test::bound_scale", outputs=("out",))
def bound_scale(x: torch.Tensor, out: torch.Tensor) -> None:
    """Writes every row, padded ones included (the runtime zeroes them); counts unbound calls."""
    BINDS["plain_calls"] += 1
    out.copy_(x * 3)


@bound_scale.binder
def _bind_scale(x: torch.Tensor, out: torch.Tensor) -> Any:
    BINDS["binds"] += 1

    def call() -> None:
        BINDS["bound_calls"] += 1
        torch.mul(x, 3, out=out)

    return call


class Leaky(nn.Module):
    """Mixes rows: every output row depends on the mean over all rows, padding included."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ToyModel(TINY)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.inner(ids)
        return h - h.mean(dim=0, keepdim=True)


class Flippable(ToyModel):
    """A bool attribute is always a guarded constant in Dynamo: flipping it forces a recompile."""

    def __init__(self) -> None:
        super().__init__(TINY)
        self.flip = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = super().forward(ids)
        return -h if self.flip else h


def flippable(seed: int = 0) -> Flippable:
    torch.manual_seed(seed)
    return Flippable().eval()


def tiny_model(seed: int = 0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(TINY).eval()


def ids(n: int) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (n,))
