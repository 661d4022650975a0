"""Speculative decoding: proposers draft tokens for running requests, one target forward verifies them
(`verify.py` decides what is accepted), and the scheduler keeps what was accepted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from tessera.engine.sequence import Sequence

if TYPE_CHECKING:
    from tessera.engine.batch import ScheduledBatch
    from tessera.engine.model_runner import ModelRunner

# what a verify's draft positions hold on the host while their tokens are on the device (`DeviceDrafts`):
# not a token id, so a forward that ran without them fails loudly instead of drafting from token 0
DRAFT_PLACEHOLDER = -1


@dataclass(eq=False)
class DeviceDrafts:
    """Drafts still on the device: `counts[i]` tokens for the i-th sequence proposed for, request-major
    in `tokens`. The verify forward takes them from there (`ForwardBatch.feed_at`), so the host launches
    it without waiting for the draft forwards; they reach the host with the verify's choices, in one
    copy (`verify_batch`), and `resolve` writes them over the sequences' placeholders."""

    counts: list[int]
    tokens: torch.Tensor  # [sum(counts)] int64
    seqs: list[Sequence] = field(default_factory=list)  # set by `Scheduler.attach_drafts`

    def split(self, values: list[int]) -> list[list[int]]:
        """`values` (the tokens on the host) cut into each sequence's drafts."""
        out, at = [], 0
        for n in self.counts:
            out.append(values[at : at + n])
            at += n
        return out

    def on_host(self) -> list[list[int]]:
        """Each sequence's drafts on the host (waits for the device)."""
        return self.split(self.tokens.tolist())

    def resolve(self, values: list[int]) -> None:
        """Write the drafts (`values`, the tokens on the host) over the placeholders of the sequences
        they went to."""
        for seq, drafts in zip(self.seqs, self.split(values), strict=True):
            if drafts:
                seq.draft_token_ids = drafts


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]] | DeviceDrafts:
        """Draft tokens for each sequence, at most its room (fewer, or none, where it has no good guess):
        on the host, or left on the device where a model drafted them. A proposer reads the sequences
        and never changes them."""
        ...

    def follow(self, batch: ScheduledBatch, target: ModelRunner, choices: torch.Tensor) -> None:
        """Right after the target's forward of `batch`, before its tokens reach the host: `choices` are
        the target's tokens at its logits rows (`batch.logits_rows` each), on the device. A proposer
        that drafts from the target's hidden states queues its own forward here, so that it runs while
        the host waits for those tokens and then schedules; the others do nothing."""
        ...

    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], target: ModelRunner) -> None:
        """After the target's forward of `work` (each sequence's first position in `starts`) and its
        postprocess: catch up on the positions each sequence kept (a draft model's or head's K/V). A
        proposer with no state of its own does nothing."""
        ...
