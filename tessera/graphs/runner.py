"""The piecewise graph runner: owns the static input buffers, captures every size at start-up, and at
serve time pads each batch up to the nearest captured size and replays it."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from tessera.graphs import ops
from tessera.graphs.breakable import BreakableStrategy
from tessera.graphs.compile import AddressMismatchError, CompileStrategy
from tessera.graphs.config import GraphConfig
from tessera.graphs.context import ForwardContext, LayerKey, forward_context
from tessera.graphs.dispatch import BatchDescriptor, GraphMode
from tessera.graphs.hygiene import frozen_gc, run_warmup_hooks
from tessera.graphs.platform import GraphBackend, make_backend, platform_name
from tessera.graphs.stats import DISABLED, OVERSIZE, GraphStats, InitReport
from tessera.graphs.strategy import CaptureStrategy, Inputs
from tessera.graphs.watchdog import watchdog

logger = logging.getLogger("tessera.graphs")

STRATEGIES: dict[str, type[CaptureStrategy]] = {
    "breakable": BreakableStrategy,
    "compile": CompileStrategy,
}


class CaptureError(RuntimeError):
    pass


class PaddingLeakError(AssertionError):
    pass


class PiecewiseGraphRunner:
    """Runs `forward(*inputs)` through piecewise graphs.

    Every input's first dimension is the token dimension. Call `capture(example_inputs)` once at
    start-up, then call the runner like `forward`. Outputs whose first dimension is the token count
    are sliced to the real tokens; they live in graph memory and are overwritten by the next call.

    A dispatcher that decides between several kinds of graph asks `descriptor(num_tokens)` and runs
    what it decided with `run(descriptor, *inputs)`; `stats` may be shared with its other runners.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        config: GraphConfig | None = None,
        *,
        layers: Mapping[LayerKey, Any] | None = None,
        capture_metadata: Callable[[int], Any] | None = None,
        stats: GraphStats | None = None,
    ) -> None:
        self.forward = forward
        self.config = config or GraphConfig()
        self.layers: Mapping[LayerKey, Any] = layers or {}
        self.capture_metadata = capture_metadata or (lambda num_tokens: None)
        self.stats = stats if stats is not None else GraphStats()
        self.report: InitReport | None = None
        self.strategy: CaptureStrategy | None = None
        self.backend: GraphBackend | None = None
        self._buffers: list[torch.Tensor] = []
        self._views: dict[int, Inputs] = {}
        self._addresses: list[int] = []
        self._num_real: torch.Tensor | None = None  # device copy of raw_num_tokens for in-graph masks
        self.reads_num_real = True  # whether a captured graph reads it (known after capture)

    @property
    def captured(self) -> bool:
        return self.strategy is not None

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.config.sizes

    def padded_size(self, num_tokens: int) -> int | None:
        """The captured size a batch of `num_tokens` replays at, or None if it runs eagerly."""
        i = bisect.bisect_left(self.config.sizes, num_tokens)
        return self.config.sizes[i] if i < len(self.config.sizes) else None

    def descriptor(self, num_tokens: int) -> BatchDescriptor:
        """How a batch of `num_tokens` runs: the piecewise graphs of its padded size, or eagerly."""
        size = self.padded_size(num_tokens) if self.captured else None
        if size is None:
            return BatchDescriptor(GraphMode.EAGER, num_tokens)
        return BatchDescriptor(GraphMode.PIECEWISE, size)

    # ---------------------------------------------------------------- start-up

    def capture(self, example_inputs: Sequence[torch.Tensor]) -> InitReport | None:
        """Allocate static buffers like `example_inputs` (token dimension grown to the largest size),
        then compile/warm up and capture every size, largest first."""
        if self.captured:
            raise RuntimeError("graphs are already captured: capture after start-up is refused")
        if not self.config.enabled:
            logger.info("piecewise graphs disabled: every forward runs eagerly")
            return None
        device = example_inputs[0].device
        backend = make_backend(device)
        strategy = STRATEGIES[self.config.strategy](self.forward, backend, self.config)
        report = InitReport(self.config.strategy, self.config.compiler, platform_name(device))
        if backend.emulated:
            logger.warning("no GPU: piecewise graphs use the emulated CPU backend (no speed-up)")
        self._allocate(example_inputs)
        t = time.perf_counter()
        run_warmup_hooks(device)
        reads = ops.num_real_reads()
        backend.synchronize()
        memory_before = backend.memory_reserved()
        report.seconds["warmup_hooks"] = time.perf_counter() - t
        with frozen_gc():
            self._timed(
                report,
                "compile" if self.config.strategy == "compile" else "warmup",
                lambda: self._prepare(strategy),
            )
            self._timed(report, "capture", lambda: self._capture_all(strategy))
        backend.synchronize()
        strategy.finish_startup()
        self.reads_num_real = ops.num_real_reads() > reads
        report.num_sizes, report.num_pieces = len(self.sizes), strategy.num_pieces
        report.graph_memory_bytes = backend.memory_reserved() - memory_before
        self.backend, self.strategy, self.report = backend, strategy, report
        self._addresses = self._tensor_addresses()
        logger.info(report.summary())
        return report

    def _allocate(self, example_inputs: Sequence[torch.Tensor]) -> None:
        largest = self.config.largest
        for x in example_inputs:
            if x.dim() == 0 or x.shape[0] == 0:
                raise ValueError("example inputs need a non-empty leading token dimension")
            # NOTE: capture runs on real example rows (tiled), never on zeros or garbage: token ids
            # must stay valid indices and data-dependent kernels must see realistic values.
            reps = -(-largest // x.shape[0])
            tiled = x.repeat(reps, *([1] * (x.dim() - 1)))[:largest].clone()
            self._buffers.append(tiled)
        self._views = {s: tuple(b[:s] for b in self._buffers) for s in self.sizes}
        self._num_real = torch.zeros((), dtype=torch.long, device=example_inputs[0].device)

    def _prepare(self, strategy: CaptureStrategy) -> None:
        largest = self.config.largest
        with self._capture_guard(strategy, largest):
            strategy.prepare(self._views[largest])

    def _capture_all(self, strategy: CaptureStrategy) -> None:
        sizes = sorted(self.sizes, reverse=True)  # largest first: smaller graphs reuse its pool
        bar = tqdm(
            sizes,
            desc="capturing piecewise graphs",
            unit="size",
            disable=not self.config.progress,
            leave=False,
        )
        for size in bar:
            with self._capture_guard(strategy, size):
                strategy.capture(size, self._views[size])

    @contextmanager
    def _capture_guard(self, strategy: CaptureStrategy, size: int) -> Iterator[None]:
        ctx = self._context(size, size, self.capture_metadata(size))
        try:
            with forward_context(ctx), watchdog(self.config.capture_timeout_s, strategy.where):
                yield
        except Exception as exc:
            raise CaptureError(
                f"capturing piecewise graphs failed in {strategy.where()} "
                f"({type(exc).__name__}: {exc}). To run without piecewise graphs, "
                f"{self.config.disable_hint}."
            ) from exc

    @staticmethod
    def _timed(report: InitReport, phase: str, fn: Callable[[], None]) -> None:
        t = time.perf_counter()
        fn()
        report.seconds[phase] = time.perf_counter() - t

    # ---------------------------------------------------------------- serving

    def __call__(self, *inputs: torch.Tensor, metadata: Any = None) -> Any:
        return self.run(self.descriptor(inputs[0].shape[0]), *inputs, metadata=metadata)

    def run(self, descriptor: BatchDescriptor, *inputs: torch.Tensor, metadata: Any = None) -> Any:
        """Run `inputs` as `descriptor` says (from `descriptor(num_tokens)`): replay the piecewise
        graphs of its size, or run eagerly inside the same forward context."""
        n = inputs[0].shape[0]
        if descriptor.mode is GraphMode.EAGER:
            reason = OVERSIZE if self.captured else DISABLED
            return self._eager(inputs, n, metadata, reason)
        captured = self.captured and descriptor.num_tokens in self._views
        if descriptor.mode is not GraphMode.PIECEWISE or not captured:
            raise ValueError(f"no piecewise graphs captured for {descriptor}")
        if n > descriptor.num_tokens:
            raise ValueError(f"{n} tokens do not fit {descriptor}")
        size = descriptor.num_tokens
        views = self._views[size]
        self._load(views, inputs, n, size, poison=False)
        if self.config.debug_addresses:
            self._check_addresses()
        assert self.strategy is not None
        with forward_context(self._context(size, n, metadata)):
            out = self.strategy.replay(size, views)
            reason = self.strategy.take_fallback()
            if self.config.poison_padding and n < size:
                out = self._poison_check(out, inputs, views, n, size)
        if reason is not None:
            self.stats.record_fallback(reason, n, f"at {size} tokens")
        else:
            self.stats.record_replay(descriptor, n)
        return _slice(out, n, size)

    def _eager(self, inputs: Inputs, n: int, metadata: Any, reason: str) -> Any:
        # NOTE: same forward context as a replay, so attention and MoE masking see the same world.
        self.stats.record_fallback(reason, n, f"({n} tokens > largest size {self.config.largest})")
        with forward_context(self._context(n, n, metadata)):
            return self.forward(*inputs)

    def _context(self, size: int, n: int, metadata: Any) -> ForwardContext:
        num_real = self._num_real if self.reads_num_real or not self.captured else None
        if num_real is not None:
            num_real.fill_(n)  # before the replay: its captured masks read this
        # NOTE: graphs with no in-graph mask skip that launch; an eager forward without num_real
        # masks with the exact raw_num_tokens instead
        return ForwardContext(
            num_tokens=size, raw_num_tokens=n, metadata=metadata, layers=self.layers, num_real=num_real
        )

    def _load(self, views: Inputs, inputs: Inputs, n: int, size: int, *, poison: bool) -> None:
        if len(inputs) != len(views):
            raise ValueError(f"expected {len(views)} inputs, got {len(inputs)}")
        for buf, x in zip(views, inputs, strict=True):
            if x.shape[1:] != buf.shape[1:] or x.dtype != buf.dtype or x.shape[0] != n:
                raise ValueError(
                    f"input of shape {tuple(x.shape)} and {x.dtype} does not match the captured "
                    f"[tokens, {', '.join(map(str, buf.shape[1:]))}] {buf.dtype} with {n} tokens"
                )
            buf[:n].copy_(x)
            if n < size:
                tail = buf[n:size]
                if not poison:
                    tail.zero_()
                elif buf.is_floating_point():
                    tail.fill_(float("nan"))
                else:  # integer ids must stay valid: poison with real rows in a random order
                    tail.copy_(x[torch.randint(0, max(n, 1), (size - n,), device=x.device)])

    def _poison_check(self, out: Any, inputs: Inputs, views: Inputs, n: int, size: int) -> Any:
        assert self.strategy is not None
        clean = [t[:n].clone() for t in _token_tensors(out, size)]
        self._load(views, inputs, n, size, poison=True)
        poisoned = self.strategy.replay(size, views)
        for i, (a, b) in enumerate(zip(clean, _token_tensors(poisoned, size), strict=True)):
            bad = changed_rows(a, b[:n])
            if bad.numel():
                raise PaddingLeakError(
                    f"output {i}: {bad.numel()} of {n} real rows (first: {bad[:8].tolist()}) changed "
                    f"when padded rows {n}..{size - 1} were poisoned; an op mixes padded rows into "
                    f"real ones"
                )
        return poisoned

    def _tensor_addresses(self) -> list[int]:
        tensors = list(self._buffers)
        if isinstance(self.forward, torch.nn.Module):
            tensors += list(self.forward.parameters()) + list(self.forward.buffers())
        return [t.data_ptr() for t in tensors]

    def _check_addresses(self) -> None:
        now = self._tensor_addresses()
        moved = [i for i, (a, b) in enumerate(zip(self._addresses, now, strict=True)) if a != b]
        if moved or len(now) != len(self._addresses):
            raise AddressMismatchError(
                f"{len(moved)} static buffer(s)/parameter(s) moved since capture (indices "
                f"{moved[:8]}); graphs would read stale memory. Update tensors in place "
                f"(`copy_`) instead of rebinding them."
            )


def _token_tensors(out: Any, size: int) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size]


def _slice(out: Any, n: int, size: int) -> Any:
    if n == size:
        return out
    return tree_map(
        lambda t: t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size else t,
        out,
    )


def changed_rows(clean: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (first dimension) where `poisoned` differs from `clean`; NaN equals NaN."""
    same = clean == poisoned
    if clean.is_floating_point():
        same |= clean.isnan() & poisoned.isnan()
    return (~same.reshape(clean.shape[0], -1).all(dim=1)).nonzero().flatten()
