"""The compile strategy: `torch.compile(fullgraph=True)` with a backend that cuts the FX graph at split
ops, compiles each piece once for the symbolic token dimension (`eager`: no codegen; `inductor`: fused
kernels), and wraps each piece so it captures and replays one graph per token count."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from tessera.graphs import ops
from tessera.graphs.platform import Graph
from tessera.graphs.stats import RECOMPILE, UNCAPTURED
from tessera.graphs.strategy import CaptureStrategy, Inputs

logger = logging.getLogger("tessera.graphs")


class AddressMismatchError(RuntimeError):
    pass


class Piece:
    """One graph piece: general-shape code plus one captured graph per token count."""

    def __init__(self, index: int, general: Callable[..., Any], owner: CompileStrategy):
        self.index = index
        self.general = general
        self.owner = owner
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, Any] = {}
        self.addresses: dict[int, list[int]] = {}

    def __call__(self, *args: Any) -> Any:
        owner = self.owner
        size = owner.graph_size
        if size is None:
            return self.general(*args)
        graph = self.graphs.get(size)
        if graph is not None:
            if owner.config.debug_addresses:
                self._check_addresses(size, args)
            graph.replay()
            return self.outputs[size]
        if not owner.capturing:
            # NOTE: capture after start-up is refused: it would fragment the shared pool.
            owner._fallback = UNCAPTURED
            return self.general(*args)
        return self._capture(size, args)

    def _capture(self, size: int, args: tuple[Any, ...]) -> Any:
        self.general(*args)  # warm-up at this size
        self.owner.location = f"piece {self.index} at {size} tokens"
        graph, out = self.owner.backend.capture(self.general, args)
        self.graphs[size] = graph
        self.outputs[size] = self.owner.backend.hold(out)
        self.addresses[size] = _addresses(args)
        return out

    def _check_addresses(self, size: int, args: tuple[Any, ...]) -> None:
        now = _addresses(args)
        for i, (then, current) in enumerate(zip(self.addresses[size], now, strict=True)):
            if then != current:
                raise AddressMismatchError(
                    f"piece {self.index} at {size} tokens: input {i} moved from {then:#x} to "
                    f"{current:#x} since capture; the graph would read stale memory"
                )


class _SplitCall:
    """Calls a split op's Python implementation directly: at run time the dispatcher round trip
    through the custom op buys nothing and costs microseconds per layer."""

    def __init__(self, split: ops.SplitOp, node: torch.fx.Node, placeholders: list[str]):
        self.run = split.run
        self.__name__ = split.name.replace("::", "_")
        index = {name: i for i, name in enumerate(placeholders)}
        self._plan = [(index[a.name], None) if isinstance(a, torch.fx.Node) else (None, a) for a in node.args]

    def __call__(self, *args: Any) -> None:
        self.run(*[args[i] if i is not None else const for i, const in self._plan])


class CompileStrategy(CaptureStrategy):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graph_size: int | None = None
        self.capturing = False
        self.pieces: list[Piece] = []
        self.splits: list[str] = []
        self._started = False
        self._compiled = torch.compile(self.forward, fullgraph=True, backend=self._backend)

    @property
    def num_pieces(self) -> int:
        return len(self.pieces)

    def prepare(self, inputs: Inputs) -> None:
        for x in inputs:
            # NOTE: one compile for every token count; without this Dynamo specialises on the first
            # size and recompiles at the second.
            torch._dynamo.mark_dynamic(x, 0)
        self.location = "Dynamo compile"
        self._call(None, inputs)

    def capture(self, size: int, inputs: Inputs) -> Any:
        self.capturing = True
        try:
            return self._call(size, inputs)
        finally:
            self.capturing = False

    def replay(self, size: int, inputs: Inputs) -> Any:
        return self._call(size, inputs)

    def finish_startup(self) -> None:
        self._started = True

    def _call(self, size: int | None, inputs: Inputs) -> Any:
        self.graph_size = size
        try:
            return self._compiled(*inputs)
        finally:
            self.graph_size = None

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if self._started:
            logger.warning("Dynamo recompiled after start-up; this graph runs without CUDA graphs")
            return self._general_after_recompile(gm)
        split_gm, piece_names, splits = split_at_split_ops(gm)
        if self.config.compiler == "inductor":
            compiled = _compile_pieces_inductor(split_gm, piece_names, example_inputs)
        else:
            compiled = {name: getattr(split_gm, name) for name in piece_names}
        self.pieces = [Piece(i, compiled[name], self) for i, name in enumerate(piece_names)]
        self.splits = splits
        for name, piece in zip(piece_names, self.pieces, strict=True):
            split_gm.__dict__[name] = piece  # the parent's forward looks submodules up by attribute
        return split_gm

    def _general_after_recompile(self, gm: torch.fx.GraphModule) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            self._fallback = RECOMPILE
            return gm(*args)

        return run


def split_at_split_ops(
    gm: torch.fx.GraphModule,
) -> tuple[torch.fx.GraphModule, list[str], list[str]]:
    """Cut `gm` before and after every split op. Returns the parent module, the names of the graph
    pieces in order, and the split ops met, in order."""
    part: dict[torch.fx.Node, int] = {}
    current = 0
    splits: list[tuple[int, ops.SplitOp, torch.fx.Node]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        split = ops.split_op_for(node.target) if node.op == "call_function" else None
        if split is None:
            part[node] = current
            continue
        current += 1
        part[node] = current
        splits.append((current, split, node))
        current += 1
    # NOTE: keep_original_order so the nodes inside each piece run in program order; without it an
    # in-place op could be reordered against a read of the tensor it mutates.
    split_gm = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    split_parts = {i for i, _, _ in splits}
    piece_names = [
        n.target
        for n in split_gm.graph.nodes
        if n.op == "call_module" and int(n.target.rsplit("_", 1)[1]) not in split_parts
    ]
    for i, split, _ in splits:
        name = f"submod_{i}"
        call = _direct_call(getattr(split_gm, name), split)
        if call is not None:
            split_gm.__dict__[name] = call
    return split_gm, piece_names, [s.name for _, s, _ in splits]


def _direct_call(sub: torch.fx.GraphModule, split: ops.SplitOp) -> _SplitCall | None:
    placeholders = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
    (node,) = [n for n in sub.graph.nodes if n.op == "call_function"]
    if node.kwargs:
        return None  # keep the custom op call; it binds keyword arguments itself
    return _SplitCall(split, node, placeholders)


def _compile_pieces_inductor(
    split_gm: torch.fx.GraphModule, piece_names: list[str], example_inputs: list[Any]
) -> dict[str, Callable[..., Any]]:
    """Compile each piece with Inductor for the symbolic shapes of its inputs, found by running the
    split module on fake tensors in Dynamo's own fake mode."""
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import compile_fx

    fake_mode = detect_fake_mode(example_inputs)
    assert fake_mode is not None, "Dynamo did not provide a fake mode"
    compiled: dict[str, Callable[..., Any]] = {}
    wanted = set(piece_names)

    class _Interpreter(torch.fx.Interpreter):
        def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_module(target, args, kwargs)
            if target in wanted:
                sub = self.fetch_attr(target)
                compiled[target] = compile_fx(sub, list(args))
            return out

    fake_args = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with fake_mode:
        _Interpreter(split_gm).run(*fake_args)
    return compiled


def _addresses(args: tuple[Any, ...]) -> list[int]:
    return [a.data_ptr() if isinstance(a, torch.Tensor) else 0 for a in args]
