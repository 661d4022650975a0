"""Configuration of the piecewise graph runtime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Strategy = Literal["compile", "breakable"]
Compiler = Literal["eager", "inductor"]

# NOTE: (start, stop inclusive, step) bands of SGLang's default piecewise schedule: dense where batches
# are common and a padded row costs the most, sparse where the GPU is busy anyway. It starts at 4; 1 and
# 2 go first here (as in vLLM's schedule and SGLang's decode one) because cuBLAS runs other kernels for
# one or two rows than for four: the toy benchmark's 1-token step replayed the 4-token graphs 5% slower
# than graphs captured for 1 token (graphs_h200.json at d314bfb), for two extra captures at start-up.
_SCHEDULE: tuple[tuple[int, int, int], ...] = (
    (1, 2, 1),
    (4, 32, 4),
    (48, 256, 16),
    (288, 512, 32),
    (576, 1024, 64),
    (1280, 4096, 256),
)
_TAIL_STEP = 512


def default_capture_sizes(max_tokens: int) -> list[int]:
    """1, 2, then SGLang's default token-count buckets up to `max_tokens` (60 sizes for 8192), ascending.

    `max_tokens` itself is always a bucket so a batch of exactly that many tokens is captured.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sizes: list[int] = []
    for start, stop, step in _SCHEDULE:
        sizes.extend(range(start, stop + 1, step))
    sizes.extend(range(4096 + _TAIL_STEP, max_tokens + 1, _TAIL_STEP))
    sizes = [s for s in sizes if s <= max_tokens]
    if not sizes or sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


@dataclass(frozen=True)
class GraphConfig:
    """How a model is cut, captured and replayed.

    `capture_sizes` wins over `max_tokens` when given. `disable_hint` is what error messages tell a
    user to do to switch the feature off (the engine sets it to its own CLI flag).
    """

    enabled: bool = True
    strategy: Strategy = "breakable"
    compiler: Compiler = "eager"
    max_tokens: int = 8192
    capture_sizes: Sequence[int] | None = None
    capture_timeout_s: float = 120.0
    # Eager forwards per size before its capture. The forward at the largest size already initialised
    # every library lazily; raise this for kernels that autotune per shape (Triton autotune).
    warmups_per_size: int = 0
    debug_addresses: bool = False
    poison_padding: bool = False
    progress: bool = True
    disable_hint: str = "pass GraphConfig(enabled=False) to run eagerly"
    sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.strategy not in ("compile", "breakable"):
            raise ValueError(f"unknown strategy {self.strategy!r}: use 'compile' or 'breakable'")
        if self.compiler not in ("eager", "inductor"):
            raise ValueError(f"unknown compiler {self.compiler!r}: use 'eager' or 'inductor'")
        if self.warmups_per_size < 0:
            raise ValueError("warmups_per_size must be >= 0")
        if self.capture_timeout_s <= 0:
            raise ValueError("capture_timeout_s must be positive")
        raw = self.capture_sizes or default_capture_sizes(self.max_tokens)
        if any(int(s) < 1 for s in raw):
            raise ValueError(f"capture sizes must be >= 1, got {sorted(raw)}")
        object.__setattr__(self, "sizes", tuple(sorted({int(s) for s in raw})))

    @property
    def largest(self) -> int:
        return self.sizes[-1]
