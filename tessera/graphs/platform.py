"""Graph backends: real CUDA/HIP graphs, or an emulation with the same static-buffer semantics on CPU.

CUDA and ROCm share one path: PyTorch's HIP build exposes HIP graphs through the `torch.cuda` API.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map


def is_hip() -> bool:
    return getattr(torch.version, "hip", None) is not None


def platform_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "emulated"
    return "rocm" if is_hip() else "cuda"


class Graph(ABC):
    @abstractmethod
    def replay(self) -> None: ...

    def fast_replay(self) -> Callable[[], None]:
        """The cheapest callable that replays this graph (replay loops resolve it once)."""
        return self.replay


class GraphBackend(ABC):
    """Captures work into replayable graphs that share one memory pool."""

    name: str
    emulated: bool

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def capture(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Graph, Any]:
        """Run `fn(*args)` under capture; return the graph and the outputs it writes on replay."""

    def hold(self, tree: Any) -> Any:
        """What a graph keeps of its outputs between replays (see `CudaGraphBackend.hold`)."""
        return tree

    def synchronize(self) -> None:
        return None

    def memory_reserved(self) -> int:
        return 0


class _CudaGraph(Graph):
    __slots__ = ("graph",)

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()

    def fast_replay(self) -> Callable[[], None]:
        return self.graph.replay


class CudaGraphBackend(GraphBackend):
    name = "cuda"
    emulated = False

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.name = platform_name(device)
        # NOTE: one pool for every graph of this runner: captured largest first, smaller graphs and
        # later pieces reuse the blocks that earlier captures freed.
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self._outer: torch.cuda.Stream | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        assert self._graph is None, "nested capture"
        self._outer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(self._outer)
        torch.cuda.set_stream(self.stream)
        self._graph = torch.cuda.CUDAGraph()
        # NOTE: capture_begin directly instead of `torch.cuda.graph(...)`: that context runs
        # gc.collect() and empty_cache() on every entry, which dominates start-up at ~2,000 captures.
        self._graph.capture_begin(pool=self.pool)

    def end(self) -> Graph:
        graph, self._graph = self._graph, None
        assert graph is not None and self._outer is not None
        try:
            graph.capture_end()
        finally:
            torch.cuda.set_stream(self._outer)
            self._outer.wait_stream(self.stream)
        return _CudaGraph(graph)

    def abort(self) -> None:
        """End a capture that failed half-way, ignoring the (expected) invalidation error."""
        if self._graph is not None:
            with contextlib.suppress(RuntimeError):
                self.end()

    def capture(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Graph, Any]:
        self.begin()
        try:
            out = fn(*args)
        except BaseException:
            self.abort()
            raise
        return self.end(), out

    def hold(self, tree: Any) -> Any:
        # NOTE: a graph keeps only non-owning views of its outputs. Once a piece's output is consumed
        # its block returns to the pool and later captures reuse it; replays run in capture order, so
        # the bytes are still there when the next piece (or the caller) reads them.
        return tree_map(_weak_alias, tree)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)


class _EmulatedGraph(Graph):
    """Replays by re-running the captured callable on the captured (static) inputs and copying the
    results into the captured outputs: inputs are read from, and outputs written to, fixed tensors,
    exactly as a CUDA graph does."""

    __slots__ = ("args", "fn", "outputs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], outputs: Any) -> None:
        self.fn, self.args, self.outputs = fn, args, outputs

    def replay(self) -> None:
        fresh, _ = tree_flatten(self.fn(*self.args))
        held, _ = tree_flatten(self.outputs)
        for dst, src in zip(held, fresh, strict=True):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


class EmulatedGraphBackend(GraphBackend):
    name = "emulated"
    emulated = True

    def capture(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Graph, Any]:
        out = fn(*args)
        return _EmulatedGraph(fn, args, out), out


def make_backend(device: torch.device) -> GraphBackend:
    if device.type == "cuda":
        return CudaGraphBackend(device)
    return EmulatedGraphBackend(device)


def _weak_alias(x: Any) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    storage = x.untyped_storage()
    alias = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), x.device, storage.nbytes())
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(alias, x.storage_offset(), x.shape, x.stride())
