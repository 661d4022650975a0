"""What a forward runs as. A dispatcher decides it once per step, before anything is staged: eagerly,
through the piecewise graphs of one padded size, or as one full graph. Replays, fallbacks and metrics are
keyed on the same descriptor, so what was decided is what is counted."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class GraphMode(StrEnum):
    EAGER = "eager"  # no graph: the real tokens, unpadded
    PIECEWISE = "piecewise"  # graph pieces between eager split ops (attention)
    FULL = "full"  # the whole forward as one graph, attention captured


@dataclass(frozen=True, order=True)
class BatchDescriptor:
    """`num_tokens`: the padded token count (the real count when eager). Full graphs are captured for a
    layout too: `num_seqs` sequence rows, and `uniform_decode` when every row is one decode token."""

    mode: GraphMode
    num_tokens: int
    num_seqs: int = 0
    uniform_decode: bool = False

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {self.num_tokens}")
        if self.mode is not GraphMode.FULL and (self.num_seqs or self.uniform_decode):
            raise ValueError("only full graphs are captured for a sequence layout")

    @property
    def kind(self) -> str:
        """The label stats and metrics use: eager, piecewise, full-decode or full-extend."""
        if self.mode is GraphMode.FULL:
            return "full-decode" if self.uniform_decode else "full-extend"
        return str(self.mode)
