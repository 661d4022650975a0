"""Speculative decoding: proposers draft tokens for running requests, one target forward verifies them
(`verify.py` decides what is accepted), and the scheduler keeps what was accepted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from tessera.engine.sequence import Sequence

if TYPE_CHECKING:
    from tessera.engine.model_runner import ModelRunner


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]]:
        """Draft tokens for each sequence, at most its room (fewer, or none, where it has no good guess).
        A proposer reads the sequences and never changes them."""
        ...

    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], target: ModelRunner) -> None:
        """After the target's forward of `work` (each sequence's first position in `starts`) and its
        postprocess: catch up on the positions each sequence kept (a draft model's or head's K/V). A
        proposer with no state of its own does nothing."""
        ...
