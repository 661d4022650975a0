"""The compile strategy: `torch.compile(fullgraph=True)` with a backend that cuts the FX graph at split
ops, compiles each piece once for the symbolic token dimension (`eager`: no codegen; `inductor`: fused
kernels), and wraps each piece so it captures and replays one graph per token count."""

from __future__ import annotations

import logging
import operator
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._dynamo.decorators import mark_unbacked
from torch._dynamo.eval_frame import remove_from_cache
from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
from torch.fx.passes.split_module import split_module
from torch.utils._pytree import tree_leaves

from tessera.graphs import ops
from tessera.graphs.config import GraphConfig
from tessera.graphs.platform import GraphBackend
from tessera.graphs.stats import RECOMPILE, UNCAPTURED
from tessera.graphs.strategy import CaptureStrategy, Inputs

logger = logging.getLogger("tessera.graphs")


class AddressMismatchError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class _Entry:
    """What a piece replays at one size, resolved at capture so replay does no searching."""

    replay: Callable[[], None]
    outputs: Any
    volatile: tuple[tuple[int, torch.Tensor], ...]  # (argument index, its static copy)
    scalars: Any  # the scalar arguments at capture, as `Piece.scalars_of` returns them
    addresses: list[int]


class Piece:
    """One graph piece: general-shape code plus one captured graph per token count."""

    def __init__(self, index: int, general: Callable[..., Any], owner: _Shared):
        self.index = index
        self.general = general
        self.owner = owner
        self.entries: dict[int, _Entry] = {}
        self.scalars_of: Callable[[tuple[Any, ...]], Any] = lambda args: ()

    def __call__(self, *args: Any) -> Any:
        owner = self.owner
        size = owner.graph_size
        if size is None:
            return self.general(*args)
        entry = self.entries.get(size)
        if entry is None:
            if not owner.capturing:
                # NOTE: capture after start-up is refused: it would fragment the shared pool.
                owner.fallback = UNCAPTURED
                return self.general(*args)
            return self._capture(size, args)
        if self.scalars_of(args) != entry.scalars:
            # NOTE: a graph bakes in the scalars it was captured with (Dynamo may have turned a
            # changed float attribute into an input). Later pieces cannot replay over outputs that
            # general code wrote elsewhere, so the rest of this forward runs general too.
            owner.fallback, owner.graph_size = RECOMPILE, None
            return self.general(*args)
        for i, static in entry.volatile:
            static.copy_(args[i])
        if owner.config.debug_addresses:
            self._check_addresses(size, entry, args)
        entry.replay()
        return entry.outputs

    def _capture(self, size: int, args: tuple[Any, ...]) -> Any:
        owner = self.owner
        owner.location = f"piece {self.index} at {size} tokens"
        for _ in range(owner.config.warmups_per_size):
            self.general(*args)
        scalar_positions = [i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
        if scalar_positions:
            self.scalars_of = operator.itemgetter(*scalar_positions)
        # NOTE: inputs that are not parameters, static inputs or earlier pieces' outputs are made
        # afresh by Dynamo on every call (e.g. a float attribute turned into a 0-d tensor); the graph
        # reads a static copy of them, refreshed before each replay.
        volatile = {
            i: a.clone()
            for i, a in enumerate(args)
            if isinstance(a, torch.Tensor) and a.data_ptr() not in owner.stable
        }
        if volatile:
            args = tuple(volatile.get(i, a) for i, a in enumerate(args))
        graph, out = owner.backend.capture(self.general, args)
        owner.stable.update(t.data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.entries[size] = _Entry(
            replay=graph.fast_replay(),
            outputs=owner.backend.hold(out),
            volatile=tuple(volatile.items()),
            scalars=self.scalars_of(args),
            addresses=_addresses(args),
        )
        return out

    def _check_addresses(self, size: int, entry: _Entry, args: tuple[Any, ...]) -> None:
        static = dict(entry.volatile)
        now = _addresses(tuple(static.get(i, a) for i, a in enumerate(args)))
        for i, (then, current) in enumerate(zip(entry.addresses, now, strict=True)):
            if then != current:
                raise AddressMismatchError(
                    f"piece {self.index} at {size} tokens: input {i} moved from {then:#x} to "
                    f"{current:#x} since capture; the graph would read stale memory"
                )


class _SplitCall:
    """Calls a split op's Python implementation directly: at run time the dispatcher round trip
    through the custom op buys nothing and costs microseconds per layer. A replay calls the op as
    bound (`SplitOp.binder`) to the tensors it was captured with at that size: they are the pieces'
    held outputs and the static inputs, so their addresses hold, and the op's per-call host work
    (pointers, strides, launch keys: ~25 µs of a paged attention launch) is done once."""

    def __init__(self, split: ops.SplitOp, node: torch.fx.Node, placeholders: list[str], owner: _Shared):
        self.split, self.owner = split, owner
        self.__name__ = split.name.replace("::", "_")
        self.bound: dict[int, Callable[[], None]] = {}
        index = {name: i for i, name in enumerate(placeholders)}
        sources = [index[a.name] if isinstance(a, torch.fx.Node) else None for a in node.args]
        fed = [i for i in sources if i is not None]
        self._consts = tuple(a for a, i in zip(node.args, sources, strict=True) if i is None)
        # NOTE: the common layout — graph values first, constants (layer id) last — gathers its
        # arguments with one C-level itemgetter; anything else goes through the general plan.
        self._simple = sources == fed + [None] * len(self._consts) and len(fed) > 1
        self._get = operator.itemgetter(*fed) if self._simple else None
        self._plan = [(i, a) for i, a in zip(sources, node.args, strict=True)]

    def __call__(self, *args: Any) -> None:
        size = self.owner.graph_size
        call = self.bound.get(size) if size is not None else None
        if call is not None:
            call()
            return
        if self._get is not None:
            op_args = (*self._get(args), *self._consts)
        else:
            op_args = tuple(args[i] if i is not None else const for i, const in self._plan)
        self.split.run(*op_args)
        if size is not None and self.owner.capturing and self._stable(op_args):
            # NOTE: bound over non-owning views, as the pieces keep their outputs: a strong reference
            # would pin every size's intermediates and unshare the graph pool.
            self.bound[size] = self.split.bound_run(*self.owner.backend.hold(op_args))

    def _stable(self, op_args: tuple[Any, ...]) -> bool:
        """Whether every tensor argument will be at this address on every replay at this size (a
        tensor Dynamo makes afresh per call would not: such an op runs unbound)."""
        stable = self.owner.stable
        return all(a.data_ptr() in stable for a in op_args if isinstance(a, torch.Tensor))


class _Shared:
    """What the compiled code reaches: the state its pieces and split calls share with the strategy.

    NOTE: Dynamo keeps a function's compiled entries on its code object, out of the garbage collector's
    sight, and every backend it was given in a module-level dict for the life of the process. Neither
    may reach the strategy, whose forward holds the model and with it the KV cache: a cycle through the
    code object is never collected, and a dropped engine would keep its memory until the process ends.
    """

    def __init__(self, backend: GraphBackend, config: GraphConfig) -> None:
        self.backend, self.config = backend, config
        self.graph_size: int | None = None
        self.capturing = False
        self.started = False
        self.fallback: str | None = None
        self.location = "start-up"
        self.stable: set[int] = set()  # data pointers a graph may read without a copy
        self.pieces: list[Piece] = []
        self.splits: list[str] = []
        self._installed: list[tuple[torch.fx.GraphModule, str]] = []  # (split module, attribute) set here

    def compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        """The Dynamo backend."""
        if self.started:
            logger.warning("Dynamo recompiled after start-up; this graph runs without CUDA graphs")
            return self._general_after_recompile(gm)
        split_gm, piece_names, splits = split_at_split_ops(gm)
        if self.config.compiler == "inductor":
            compiled = _compile_pieces_inductor(split_gm, piece_names, example_inputs)
        else:
            compiled = {name: getattr(split_gm, name) for name in piece_names}
        self.pieces = [Piece(i, compiled[name], self) for i, name in enumerate(piece_names)]
        self.splits = [split.name for _, split in splits]
        # NOTE: the parent's forward looks submodules up by attribute, so instance attributes
        # replace them; done after compiling, which runs the split module on fake tensors.
        for name, piece in zip(piece_names, self.pieces, strict=True):
            split_gm.__dict__[name] = piece
            self._installed.append((split_gm, name))
        for name, split in splits:
            call = _direct_call(getattr(split_gm, name), split, self)
            if call is not None:
                split_gm.__dict__[name] = call
                self._installed.append((split_gm, name))
        return split_gm

    def release(self) -> None:
        """Drop the pieces, their graphs and held outputs, and the bound split calls, now. (The strategy's
        finalizer, after Dynamo's cache let go of the split module: that module and its FX graph are a
        reference cycle, which the collector frees one pass later; until then it would keep the graphs,
        their outputs and what the split calls were bound to, the KV cache.)"""
        for module, name in self._installed:
            module.__dict__.pop(name, None)
        for piece in self.pieces:
            piece.entries.clear()
        self._installed, self.pieces = [], []
        self.stable.clear()

    def _general_after_recompile(self, gm: torch.fx.GraphModule) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            self.fallback = RECOMPILE
            return gm(*args)

        return run


class _WeakBackend:
    """The backend handed to Dynamo (which keeps it for the process's life): `_Shared.compile` through a
    weak reference, so that what Dynamo keeps does not keep the pieces' graphs and outputs."""

    def __init__(self, shared: _Shared) -> None:
        self._shared = weakref.ref(shared)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        shared = self._shared()
        if shared is None:
            raise RuntimeError("a dropped graph runner's compiled forward was called")
        return shared.compile(gm, example_inputs)


class CompileStrategy(CaptureStrategy):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shared = shared = _Shared(self.backend, self.config)
        if isinstance(self.forward, torch.nn.Module):
            tensors = [*self.forward.parameters(), *self.forward.buffers()]
            shared.stable.update(t.data_ptr() for t in tensors)
        entry = _own_code(self.forward)
        self._compiled = torch.compile(entry, fullgraph=True, backend=_WeakBackend(shared))
        # NOTE: Dynamo's C side keeps the code object, and on it the compiled graphs, their pieces and the
        # attention launches bound to the KV cache, after the strategy is gone: they are dropped with it.
        weakref.finalize(self, _forget, entry.__code__, shared)

    @property
    def num_pieces(self) -> int:
        return len(self.shared.pieces)

    @property
    def pieces(self) -> list[Piece]:
        return self.shared.pieces

    @property
    def splits(self) -> list[str]:
        return self.shared.splits

    def where(self) -> str:
        return self.shared.location

    def take_fallback(self) -> str | None:
        reason, self.shared.fallback = self.shared.fallback, None
        return reason

    def prepare(self, inputs: Inputs) -> None:
        for x in inputs:
            # NOTE: unbacked, not merely dynamic: a backed size has a hint, and Inductor installs
            # guards from hints (seen: `96 <= s0` after compiling at 96), so every smaller size
            # recompiled the whole forward and shadowed the graphs captured before it.
            mark_unbacked(x, 0)
        self.shared.location = f"the Dynamo compile at {inputs[0].shape[0]} tokens"
        self._call(None, inputs)

    def capture(self, size: int, inputs: Inputs) -> Any:
        shared = self.shared
        shared.stable.update(x.data_ptr() for x in inputs)
        shared.capturing = True
        try:
            return self._call(size, inputs)
        finally:
            shared.capturing = False

    def replay(self, size: int, inputs: Inputs) -> Any:
        try:
            return self._call(size, inputs)
        except (TorchDynamoException, FailOnRecompileLimitHit) as exc:
            # NOTE: Dynamo refuses before running any compiled code, so nothing ran twice.
            logger.warning("Dynamo failed after start-up (%s); running eagerly", type(exc).__name__)
            self.shared.fallback = RECOMPILE
            return self.forward(*inputs)

    def finish_startup(self) -> None:
        self.shared.started = True

    def _call(self, size: int | None, inputs: Inputs) -> Any:
        shared = self.shared
        shared.graph_size = size
        try:
            return self._compiled(*inputs)
        finally:
            shared.graph_size = None


def _forget(code: types.CodeType, shared: _Shared) -> None:
    """A dropped strategy's compiled code out of Dynamo's cache, and what its pieces held released."""
    remove_from_cache(code)
    shared.release()


def _own_code(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A trampoline to `forward` with a code object of its own.

    NOTE: Dynamo keeps compiled entries on the *code object*, shared by every instance of a model
    class, and with inlined nn.Modules the guards do not pin the instance. Runners over the same class
    would then share one cache: they exhaust the recompile limit, and once a runner is freed its
    backend's id can be reused, letting a new runner replay a dead runner's graphs. A private code
    object gives each runner a private cache, which its strategy empties when it is collected.
    """

    def entry(*inputs: Any) -> Any:
        return forward(*inputs)

    entry.__code__ = entry.__code__.replace()
    return entry


def split_at_split_ops(
    gm: torch.fx.GraphModule,
) -> tuple[torch.fx.GraphModule, list[str], list[tuple[str, ops.SplitOp]]]:
    """Cut `gm` before and after every split op. Returns the parent module, the names of the graph
    pieces in order, and the split submodules with their ops, in order."""
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
    return split_gm, piece_names, [(f"submod_{i}", split) for i, split, _ in splits]


def _direct_call(sub: torch.fx.GraphModule, split: ops.SplitOp, owner: _Shared) -> _SplitCall | None:
    placeholders = [n.name for n in sub.graph.nodes if n.op == "placeholder"]
    (node,) = [n for n in sub.graph.nodes if n.op == "call_function"]
    if node.kwargs:
        return None  # keep the custom op call; it binds keyword arguments itself
    return _SplitCall(split, node, placeholders, owner)


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
