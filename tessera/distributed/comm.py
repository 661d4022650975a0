"""TP collectives as ops of the graph runtime.

`all_reduce` is by default an opaque op: it stays inside a captured piece (an NCCL all-reduce is
capturable), so a TP forward keeps exactly the pieces a single-GPU one has. Where the collective cannot
be captured, `set_all_reduce_placement("split")` makes it a split op instead: a graph boundary that runs
eagerly between pieces and writes into a preallocated output.

Inputs are token-major ([T, ...]). Their padded rows (past the batch's real rows, see
`tessera::padded_rows`) are zeroed before any collective, so a graph replay's garbage padding never
enters a reduction; the mask is computed on the device, so it is right on every replay.
With one rank and no process group every function returns its input unchanged and calls no op.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from tessera.distributed.state import tp_group, tp_size
from tessera.graphs import opaque_op, split_op
from tessera.graphs.ops import padded_rows

Placement = Literal["inside", "split"]
_placement: Placement = "inside"

# NOTE: torch 2.13 deprecates all_gather_into_tensor for all_gather_single; older versions lack the latter
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def set_all_reduce_placement(placement: Placement) -> Placement:
    """Where all-reduces go: "inside" graph pieces (an opaque op) or "split" (a graph boundary). Layers
    read it when they are built, so set it before building the model. Returns the previous placement."""
    global _placement
    if placement not in ("inside", "split"):
        raise ValueError(f"all-reduce placement must be 'inside' or 'split', got {placement!r}")
    previous, _placement = _placement, placement
    return previous


def all_reduce_placement() -> Placement:
    return _placement


def all_reduce(x: torch.Tensor, placement: Placement | None = None) -> torch.Tensor:
    """The sum of `x` [T, ...] over the TP ranks, as a new tensor (padded rows zero)."""
    if tp_group() is None:
        return x
    if (placement or _placement) == "inside":
        return torch.ops.tessera.all_reduce(x)
    out = torch.empty_like(x)
    torch.ops.tessera.all_reduce_into(x, out)
    return out


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The TP ranks' `x` [T, ...] concatenated along `dim` in rank order (an opaque op)."""
    if tp_group() is None:
        return x
    return torch.ops.tessera.all_gather(x, dim % x.dim())


def _zero_padded_rows_(x: torch.Tensor) -> torch.Tensor:
    mask = padded_rows(x)  # bool [T], recomputed on the device at every replay
    return x.masked_fill_(mask.view(-1, *([1] * (x.dim() - 1))), 0)


def _reduce_(x: torch.Tensor) -> None:
    dist.all_reduce(_zero_padded_rows_(x), group=tp_group())


@opaque_op("tessera::all_reduce", fake=lambda x: torch.empty_like(x))
def _all_reduce_op(x: torch.Tensor) -> torch.Tensor:
    # NOTE: reduce a copy: a custom op must not write to its input
    out = x.clone()
    _reduce_(out)
    return out


# zeroes_padding: the padded rows are zero on every rank before the sum, so they are zero after it
@split_op("tessera::all_reduce_into", outputs=("out",), zeroes_padding=True)
def _all_reduce_into(x: torch.Tensor, out: torch.Tensor) -> None:
    _reduce_(out.copy_(x))


def _gathered_shape(x: torch.Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] *= tp_size()
    return shape


@opaque_op("tessera::all_gather", fake=lambda x, dim: x.new_empty(_gathered_shape(x, dim)))
def _all_gather_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    world = tp_size()
    src = _zero_padded_rows_(x.clone(memory_format=torch.contiguous_format))
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # ranks' blocks stacked along dim 0
    _gather_into(out, src, group=tp_group())
    # [W, ..., x_dim, ...] -> rank blocks side by side along `dim`
    return out.view(world, *x.shape).movedim(0, dim).reshape(_gathered_shape(x, dim))
