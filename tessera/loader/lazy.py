"""Checkpoint tensors that are read only once a rank has narrowed them to its slice (the `LazyTensor` the
layers' weight loaders take): a safetensors tensor, read with `get_slice`, or a seeded random one."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

Box = tuple[tuple[int, int], ...]  # [start, stop) along each dim
Reader = Callable[[tuple[slice, ...]], torch.Tensor]  # a box of the full tensor, read


@dataclass(frozen=True)
class LazySlice:
    """A box of a tensor of `full_shape` that `read` gives for a tuple of slices."""

    read: Reader
    box: Box
    name: str = ""

    @classmethod
    def whole(cls, read: Reader, shape: Any, name: str = "") -> LazySlice:
        return cls(read, tuple((0, int(n)) for n in shape), name)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self.box)

    def dim(self) -> int:
        return len(self.box)

    def narrow(self, dim: int, start: int, length: int) -> LazySlice:
        dim %= len(self.box)
        begin, stop = self.box[dim]
        if start < 0 or length < 0 or begin + start + length > stop:
            raise ValueError(f"{self.name}: [{start}, {start + length}) is past dim {dim} of {stop - begin}")
        box = (*self.box[:dim], (begin + start, begin + start + length), *self.box[dim + 1 :])
        return replace(self, box=box)

    def materialize(self) -> torch.Tensor:
        return self.read(tuple(slice(start, stop) for start, stop in self.box))


def safetensors_slice(handle: Any, name: str) -> LazySlice:
    """Tensor `name` of an open `safe_open` handle; valid while the handle is open."""
    part = handle.get_slice(name)
    shape = part.get_shape()
    if not shape:  # a 0-d tensor: nothing to narrow
        return LazySlice.whole(lambda _: handle.get_tensor(name), shape, name)
    return LazySlice.whole(lambda box: part[box], shape, name)


def seeded(name: str, shape: tuple[int, ...], device: torch.device) -> LazySlice:
    """Dummy weights, the same at every TP size: the full tensor drawn from a generator seeded by its
    name (norm weights: ones; else N(0, 0.02), small enough to stay finite), then this rank's box of it.
    """

    def read(box: tuple[slice, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.float32, device=device)[box]
        gen = torch.Generator(device).manual_seed(_seed(name))
        return torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)[box]

    return LazySlice.whole(read, shape, name)


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1  # 63 bits
