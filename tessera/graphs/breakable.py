"""The breakable strategy: no Dynamo. The forward runs once per size under stream capture; each split
op ends the current capture, runs eagerly, is recorded as an eager step over the (static) tensors it
was given, and a new capture begins. Start-up takes seconds; the kernels are the eager ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tessera.graphs import ops
from tessera.graphs.context import get_forward_context
from tessera.graphs.platform import CudaGraphBackend, Graph
from tessera.graphs.strategy import CaptureStrategy, Inputs


class _EagerStep(Graph):
    """A split op replayed eagerly. Its padded rows are zeroed by the next graph segment, or by the op
    itself (`zeroes_padding`)."""

    __slots__ = ("args", "call")

    def __init__(self, split: ops.SplitOp, args: tuple[Any, ...]) -> None:
        self.args = args  # held: the static buffers stay alive as long as the graph
        self.call = split.bound(*args)

    def replay(self) -> None:
        self.call()

    def fast_replay(self) -> Callable[[], None]:
        return self.call


class _SegmentedGraph(Graph):
    """Graph segments and eager steps, replayed in capture order."""

    __slots__ = ("calls",)

    def __init__(self, steps: list[Graph]) -> None:
        # NOTE: bound methods resolved once; the replay loop is the whole per-step host cost.
        self.calls: list[Callable[[], None]] = [s.fast_replay() for s in steps]

    def replay(self) -> None:
        for call in self.calls:
            call()


class BreakableStrategy(CaptureStrategy):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._graphs: dict[int, Graph] = {}
        self._outputs: dict[int, Any] = {}
        self._pieces = 0
        # [largest, 1] bool, True on padded rows; refreshed once per replay (CUDA only) when a
        # captured segment zeroes a split op's padded rows against it.
        self._padded: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._masked = False

    @property
    def num_pieces(self) -> int:
        return self._pieces

    def prepare(self, inputs: Inputs) -> None:
        self.location = f"the first forward at {inputs[0].shape[0]} tokens"
        if isinstance(self.backend, CudaGraphBackend):
            largest = inputs[0].shape[0]
            self._positions = torch.arange(largest, device=inputs[0].device).view(largest, 1)
            self._padded = torch.zeros(largest, 1, dtype=torch.bool, device=inputs[0].device)
        self.forward(*inputs)

    def capture(self, size: int, inputs: Inputs) -> Any:
        self.location = f"the warm-up forward at {size} tokens"
        for _ in range(self.config.warmups_per_size):
            self.forward(*inputs)
        splits: list[str] = []
        self.location = f"segment 0 at {size} tokens"
        if isinstance(self.backend, CudaGraphBackend):
            graph, out = self._capture_segments(size, inputs, splits)
        else:
            with _intercept(lambda split, args: self._count(split, args, size, splits)):
                graph, out = self.backend.capture(self.forward, inputs)
        self._pieces = len(splits) + 1
        self._graphs[size] = graph
        self._outputs[size] = self.backend.hold(out)
        return out

    def replay(self, size: int, inputs: Inputs) -> Any:
        if self._masked:
            assert self._padded is not None and self._positions is not None
            raw = get_forward_context().raw_num_tokens
            torch.ge(self._positions[:size], raw, out=self._padded[:size])
        self._graphs[size].replay()
        return self._outputs[size]

    def _count(self, split: ops.SplitOp, args: tuple[Any, ...], size: int, splits: list[str]):
        splits.append(split.name)
        self.location = f"segment {len(splits)} (after {split.name}) at {size} tokens"
        split.run(*args)

    def _capture_segments(self, size: int, inputs: Inputs, splits: list[str]) -> tuple[Graph, Any]:
        backend = self.backend
        assert isinstance(backend, CudaGraphBackend)
        steps: list[Graph] = []

        def on_split(split: ops.SplitOp, args: tuple[Any, ...]) -> None:
            steps.append(backend.end())
            self._count(split, args, size, splits)
            steps.append(_EagerStep(split, backend.hold(args)))
            backend.begin()
            if split.zeroes_padding:
                return
            # NOTE: zero the op's padded rows inside the next segment, against a mask refreshed once
            # per step, instead of one eager launch per layer. masked_fill, unlike a multiply by a
            # 0/1 mask, also clears NaN.
            assert self._padded is not None
            self._masked = True
            for i in split.output_positions:
                out = args[i][:size]
                out.masked_fill_(self._padded[:size].view(size, *[1] * (out.dim() - 1)), 0)

        backend.begin()
        try:
            with _intercept(on_split):
                out = self.forward(*inputs)
        except BaseException:
            backend.abort()
            raise
        steps.append(backend.end())
        return _SegmentedGraph(steps), out


@contextmanager
def _intercept(fn: ops.SplitInterceptor) -> Iterator[None]:
    previous = ops.set_split_interceptor(fn)
    try:
        yield
    finally:
        ops.set_split_interceptor(previous)
