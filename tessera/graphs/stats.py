"""Counters that are always on: what replayed, what fell back and why, and what padding cost."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tessera.graphs.dispatch import BatchDescriptor

logger = logging.getLogger("tessera.graphs")

# Reasons a forward did not replay a captured graph.
OVERSIZE = "oversize"  # more tokens than the largest captured size
RECOMPILE = "recompile"  # Dynamo had to recompile after start-up
UNCAPTURED = "uncaptured_size"  # a compiled piece met a size it holds no graph for
DISABLED = "disabled"  # graphs are switched off, or not captured yet


@dataclass
class GraphStats:
    """Counters keyed on the dispatcher's `BatchDescriptor`; one object may serve several runners (the
    engine's piecewise and full graphs share one)."""

    replays: Counter[BatchDescriptor] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    real_tokens: int = 0
    padded_tokens: int = 0
    _warned: set[str] = field(default_factory=set, repr=False)

    def record_replay(self, descriptor: BatchDescriptor, raw: int) -> None:
        self.replays[descriptor] += 1
        self.real_tokens += raw
        self.padded_tokens += descriptor.num_tokens - raw

    def sizes(self, kind: str) -> Counter[int]:
        """Replays of one kind of graph (see BatchDescriptor.kind) by padded token count."""
        return Counter({d.num_tokens: n for d, n in self.replays.items() if d.kind == kind})

    def record_fallback(self, reason: str, tokens: int, detail: str = "") -> None:
        self.fallbacks[reason] += 1
        self.real_tokens += tokens
        if reason not in self._warned and reason != DISABLED:
            self._warned.add(reason)
            logger.warning("graphs: eager fallback (%s) %s", reason, detail)

    def as_dict(self) -> dict[str, Any]:
        """`replays`: {kind: {padded size: count}} (kinds: piecewise, full-decode, full-extend)."""
        replays: dict[str, dict[str, int]] = {}
        for d, n in sorted(self.replays.items()):
            replays.setdefault(d.kind, {})[str(d.num_tokens)] = n
        return {
            "replays": replays,
            "eager_fallbacks": dict(self.fallbacks),
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
        }


@dataclass
class InitReport:
    """What start-up cost: seconds per phase, graph memory, how much was captured.

    `graph_memory_bytes` is how much the allocator's reserved memory grew over start-up: the graphs'
    shared pool plus blocks the warm-up forward left cached (0 on the emulated backend).
    """

    strategy: str
    compiler: str
    platform: str
    num_sizes: int = 0
    num_pieces: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    graph_memory_bytes: int = 0

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "compiler": self.compiler,
            "platform": self.platform,
            "num_sizes": self.num_sizes,
            "num_pieces": self.num_pieces,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "total_seconds": round(self.total_seconds, 3),
            "graph_memory_bytes": self.graph_memory_bytes,
        }

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return (
            f"piecewise graphs ({self.strategy}/{self.compiler} on {self.platform}): "
            f"{self.num_sizes} sizes x {self.num_pieces} pieces in {self.total_seconds:.2f}s "
            f"({phases}), graph memory {self.graph_memory_bytes / 2**20:.1f} MiB"
        )
