"""Speculative decoding: proposers draft tokens for running requests, one target forward verifies them
(`verify.py` decides what is accepted), and the scheduler keeps what was accepted."""

from __future__ import annotations

from typing import Protocol

from tessera.engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]]:
        """Draft tokens for each sequence, at most its room (fewer, or none, where it has no good guess).
        A proposer reads the sequences and never changes them."""
        ...
