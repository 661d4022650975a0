"""Full graphs: the whole forward, attention included, captured as one graph per descriptor.

The other strategy of the runtime beside the piecewise graphs, sharing their backend (one memory pool),
their stats and their padding checks. Attention inside a full graph cannot read host metadata, so the
caller owns static buffers holding all of it and stages each batch into them; this runner owns the
graphs and their outputs (the runner-owns-buffers, wrapper-owns-graphs split of vLLM's CUDA graph
wrapper). The caller provides:

1. `forward(descriptor)`: the model over its static buffers, inside a forward context it sets itself
   (the emulated backend's replay calls it again);
2. `stage(descriptor, batch)`: write `batch` (None: padding only, for capture) into those buffers;
3. optionally `poison(descriptor, num_real)`: fill the padded rows' inputs with other valid values, for
   the debug check that padded rows never change real ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from tessera.graphs.dispatch import BatchDescriptor, GraphMode
from tessera.graphs.hygiene import frozen_gc
from tessera.graphs.platform import Graph, GraphBackend
from tessera.graphs.runner import PaddingLeakError, changed_rows
from tessera.graphs.stats import GraphStats

logger = logging.getLogger("tessera.graphs")


class FullGraphRunner:
    def __init__(
        self,
        forward: Callable[[BatchDescriptor], torch.Tensor],
        stage: Callable[[BatchDescriptor, Any], None],
        backend: GraphBackend,
        *,
        stats: GraphStats | None = None,
        poison: Callable[[BatchDescriptor, int], None] | None = None,
    ) -> None:
        self.forward, self.stage, self.backend, self.poison = forward, stage, backend, poison
        self.stats = stats if stats is not None else GraphStats()
        self.graphs: dict[BatchDescriptor, Graph] = {}
        self.outputs: dict[BatchDescriptor, torch.Tensor] = {}

    @property
    def descriptors(self) -> list[BatchDescriptor]:
        return sorted(self.graphs)

    @torch.no_grad()
    def capture(self, descriptors: Iterable[BatchDescriptor], progress: bool = True) -> None:
        """Capture every descriptor, largest first so smaller graphs reuse the pool's blocks."""
        todo = sorted(set(descriptors), key=lambda d: (d.num_tokens, d.num_seqs), reverse=True)
        if any(d.mode is not GraphMode.FULL for d in todo):
            raise ValueError("a full-graph runner captures FULL descriptors only")
        with frozen_gc():
            for d in tqdm(todo, desc="capturing full graphs", disable=not progress, leave=False):
                self.stage(d, None)
                # NOTE: warm-up (Triton JIT and BLAS heuristics for this shape) only where capture
                # records: the emulated backend's capture is itself one plain forward, and a second
                # one before it warms nothing (in the Triton interpreter it doubles a CPU test's capture)
                if not self.backend.emulated:
                    self.forward(d)
                self.graphs[d], self.outputs[d] = self.backend.capture(self.forward, (d,))
        for kind in sorted({d.kind for d in todo}):
            sizes = sorted(d.num_tokens for d in todo if d.kind == kind)
            logger.info("full graphs captured (%s): token counts %s", kind, sizes)

    @torch.no_grad()
    def run(self, descriptor: BatchDescriptor, batch: Any, num_real: int) -> torch.Tensor:
        """Stage `batch` (`num_real` tokens) for `descriptor`, replay its graph and return the first
        `num_real` rows of its output (graph memory: valid until the next replay)."""
        graph = self.graphs.get(descriptor)
        if graph is None or num_real > descriptor.num_tokens:
            raise ValueError(f"{num_real} tokens cannot run as {descriptor} (captured: {graph is not None})")
        self.stage(descriptor, batch)
        graph.replay()
        self.stats.record_replay(descriptor, num_real)
        out = self.outputs[descriptor]
        if self.poison is not None and num_real < descriptor.num_tokens:
            self._poison_check(graph, out, descriptor, num_real)
        return out[:num_real]

    def _poison_check(self, graph: Graph, out: torch.Tensor, d: BatchDescriptor, n: int) -> None:
        assert self.poison is not None
        clean = out[:n].clone()
        self.poison(d, n)
        graph.replay()
        bad = changed_rows(clean, out[:n])
        if bad.numel():
            raise PaddingLeakError(
                f"full graph {d}: {bad.numel()} of {n} real rows (first: {bad[:8].tolist()}) changed "
                f"when padded rows {n}..{d.num_tokens - 1} were poisoned; an op mixes padded rows into "
                "real ones"
            )
