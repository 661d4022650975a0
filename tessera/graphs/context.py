"""The forward context: what split ops need to know about the batch they run in.

Custom ops can only take tensors and scalars, so attention finds its layer object and the batch's
metadata here. The runner sets one context around every forward — graph capture, graph replay and
eager fallback alike — so an op sees the same view of the world on every path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

LayerKey = tuple[int, str]


@dataclass
class ForwardContext:
    """Per-forward state. `num_tokens` is the padded count the graph was captured for;
    `raw_num_tokens` the real rows. Rows in `[raw_num_tokens, num_tokens)` are padding."""

    num_tokens: int
    raw_num_tokens: int
    metadata: Any = None
    layers: Mapping[LayerKey, Any] = field(default_factory=dict)
    # raw_num_tokens on the device (a runner's static 0-d tensor, refreshed before every forward): what
    # code inside a graph must read, since a replay re-runs kernels, not Python (see `padded_rows`)
    num_real: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.raw_num_tokens <= self.num_tokens:
            raise ValueError(
                f"raw_num_tokens={self.raw_num_tokens} must be in [0, num_tokens={self.num_tokens}]"
            )

    @property
    def num_padded(self) -> int:
        return self.num_tokens - self.raw_num_tokens

    def layer(self, layer_id: int, role: str = "attn") -> Any:
        """The object registered for `(layer_id, role)`; roles are explicit, never guessed
        (an MLA layer registers both its MHA and its MQA path)."""
        try:
            return self.layers[(layer_id, role)]
        except KeyError:
            roles = sorted(r for i, r in self.layers if i == layer_id)
            raise KeyError(
                f"no layer registered for (layer_id={layer_id}, role={role!r}); "
                f"roles registered for this layer: {roles or 'none'}"
            ) from None


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError(
            "no forward context is set: split ops must run inside forward_context(...) "
            "(the graph runner sets it around every forward)"
        )
    return _current


def has_forward_context() -> bool:
    return _current is not None


def current_forward_context() -> ForwardContext | None:
    """The context set now, or None outside any forward (an op that can also run alone)."""
    return _current


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    # NOTE: a plain module global rather than a ContextVar: it is read once per split op on the hot
    # path, and one engine thread drives a model at a time.
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous
