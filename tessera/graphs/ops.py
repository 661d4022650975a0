"""Registering the two kinds of custom op the runtime knows.

* A **split op** is a graph boundary (attention, a non-capturable collective). It runs eagerly between
  pieces, returns nothing and writes its result into preallocated `outputs`, so every tensor that
  crosses a piece boundary keeps a stable address. The runtime zeroes the padded rows of those outputs
  after the op ran, so padding never leaks out of attention.
* An **opaque op** stays *inside* a piece. Dynamo does not trace into it (it sees only the fake
  implementation), which is how hand-written Triton/JIT kernels survive `fullgraph=True`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tessera.graphs.context import current_forward_context

SplitFn = Callable[..., None]
# Set while a breakable capture is running: it turns each split-op call into a graph break.
SplitInterceptor = Callable[["SplitOp", tuple[Any, ...]], None]
_interceptor: SplitInterceptor | None = None


@dataclass(eq=False)
class SplitOp:
    name: str
    fn: SplitFn
    op: Any  # the torch.library custom op
    output_positions: tuple[int, ...]
    zeroes_padding: bool = False  # the op writes zeros to its outputs' rows past raw_num_tokens itself
    _binder: Callable[..., Callable[[], None] | None] | None = None

    def binder(
        self, bind: Callable[..., Callable[[], None] | None]
    ) -> Callable[..., Callable[[], None] | None]:
        """Decorator: `bind(*args)` returns a zero-argument callable that does what `fn(*args)` does,
        for these very tensors, with whatever depends only on them (pointers, strides, a kernel's
        cache key) worked out once, or None where it has nothing to prepare (then `fn` runs). A graph
        replays a split op over the static buffers it captured it with, so its replay calls that
        instead of `fn` on every replay."""
        self._binder = bind
        return bind

    def bound(self, *args: Any) -> Callable[[], None]:
        """`fn` over `args`, prepared by the op's binder if it has one."""
        call = self._binder(*args) if self._binder is not None else None
        return call if call is not None else functools.partial(self.fn, *args)

    def bound_run(self, *args: Any) -> Callable[[], None]:
        """What `run(*args)` does, for these very tensors: the bound op, then the padded tail zeroed."""
        call = self.bound(*args)
        if self.zeroes_padding:
            return call
        outputs = [args[i] for i in self.output_positions]

        def run() -> None:
            call()
            _zero_padded_rows(outputs)

        return run

    def run(self, *args: Any) -> None:
        """Run eagerly (positional arguments), then zero the padded tail of the outputs (unless the op
        zeroes it itself)."""
        self.fn(*args)
        if not self.zeroes_padding:
            _zero_padded_rows([args[i] for i in self.output_positions])

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.op(*args, **kwargs)


def _zero_padded_rows(outputs: list[torch.Tensor]) -> None:
    ctx = current_forward_context()
    if ctx is not None and ctx.raw_num_tokens < ctx.num_tokens:
        for out in outputs:
            out[ctx.raw_num_tokens : ctx.num_tokens].zero_()


_SPLIT_OPS: dict[str, SplitOp] = {}
_SPLIT_TARGETS: dict[Any, SplitOp] = {}
_OPAQUE_OPS: dict[str, Any] = {}


def split_op(
    name: str, *, outputs: Sequence[str], mutates: Sequence[str] = (), zeroes_padding: bool = False
) -> Callable[[SplitFn], SplitOp]:
    """Register `fn` as a split op named `name` ("namespace::op").

    `outputs` name the token-indexed arguments the op writes its result into (rows past
    `raw_num_tokens` are zeroed by the runtime); `mutates` names other arguments it writes (a KV cache).
    `zeroes_padding`: the op writes zeros to its outputs' rows `raw_num_tokens .. num_tokens` of the
    forward context itself, so the runtime adds nothing (no launch, no kernel in the next piece).
    """

    def register(fn: SplitFn) -> SplitOp:
        if name in _SPLIT_OPS:
            raise ValueError(f"split op {name!r} is already registered")
        params = list(inspect.signature(fn).parameters)
        missing = [o for o in (*outputs, *mutates) if o not in params]
        if missing or not outputs:
            raise ValueError(f"split op {name!r}: outputs must name parameters of {fn.__name__}")
        mutates_args = (*outputs, *mutates)
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        positions = tuple(params.index(o) for o in outputs)
        holder: list[SplitOp] = []

        def impl(*args: Any, **kwargs: Any) -> None:
            split = holder[0]
            if kwargs:
                args = _positional(fn, args, kwargs)
            if _interceptor is not None:
                _interceptor(split, args)
            else:
                split.run(*args)

        op = torch.library.custom_op(name, impl, mutates_args=mutates_args, schema=schema)
        op.register_fake(lambda *args, **kwargs: None)
        split = SplitOp(name=name, fn=fn, op=op, output_positions=positions, zeroes_padding=zeroes_padding)
        holder.append(split)
        _SPLIT_OPS[name] = split
        packet = _op_packet(name)
        _SPLIT_TARGETS[packet] = split
        _SPLIT_TARGETS[packet.default] = split
        return split

    return register


def opaque_op(
    name: str, *, fake: Callable[..., Any], mutates: Sequence[str] = ()
) -> Callable[[Callable[..., Any]], Any]:
    """Register `fn` as an opaque op: compiled graphs call it as a black box, pieces capture it.

    `fake` computes output metadata (shapes, dtypes) from fake inputs without running the kernel.
    """

    def register(fn: Callable[..., Any]) -> Any:
        if name in _OPAQUE_OPS:
            raise ValueError(f"opaque op {name!r} is already registered")
        op = torch.library.custom_op(name, fn, mutates_args=tuple(mutates))
        op.register_fake(fake)
        _OPAQUE_OPS[name] = op
        return op

    return register


def split_op_for(target: Any) -> SplitOp | None:
    """The split op an FX node target calls, if any (Dynamo records the overload packet)."""
    return _SPLIT_TARGETS.get(target)


def registered_split_ops() -> list[str]:
    return sorted(_SPLIT_OPS)


def registered_opaque_ops() -> list[str]:
    return sorted(_OPAQUE_OPS)


def set_split_interceptor(fn: SplitInterceptor | None) -> SplitInterceptor | None:
    global _interceptor
    previous, _interceptor = _interceptor, fn
    return previous


def _op_packet(name: str) -> Any:
    namespace, opname = name.split("::")
    return getattr(getattr(torch.ops, namespace), opname)


def _positional(fn: SplitFn, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


_num_real_reads = 0  # how often padded_rows read a context's num_real (see num_real_reads)


def _padded_rows_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[0], dtype=torch.bool, device=x.device)


@opaque_op("tessera::padded_rows", fake=_padded_rows_fake)
def padded_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [T] over x's rows: True on the padding a graph replay carries past the batch's real rows.

    Computed on the device from the forward context's `num_real`, so a captured graph recomputes it on
    every replay (a Python int would be frozen at capture); opaque, so Dynamo never bakes it in either.
    All False outside a runner's forward."""
    global _num_real_reads
    rows = torch.arange(x.shape[0], device=x.device)
    ctx = current_forward_context()
    if ctx is None:
        return rows < 0
    if ctx.num_real is None:
        return rows >= ctx.raw_num_tokens
    _num_real_reads += 1
    return rows >= ctx.num_real


def num_real_reads() -> int:
    """How often `padded_rows` has read a forward context's `num_real` (a runner compares the count
    before and after capture: graphs that never read it need no refresh before each replay)."""
    return _num_real_reads
