"""EAGLE drafting (EAGLE-1/2 chain, top-k 1): a one-layer head over the target's hidden states.

The head's row at position i takes token i + 1 and the target's feature (final hidden state) at
position i, and predicts token i + 2; each later draft step takes the draft token just proposed and the
head's own output as its feature. So the head runs every position the target kept, with the target's
features, before it drafts from there: its K/V at positions drafted from its own features is rewritten
from the target's once the target has run them (EAGLE's "stable" K/V).

The head follows the target (`observe`): after each target forward it runs the positions the target
kept — a prefill chunk's, a plain decode's, a verify's last token and accepted drafts — with the
target's features, in the same step (so no feature is stored, and the head's forward is never larger
than the target's), and keeps what its last row gave: the request's first draft token and the feature
of the next draft step. A proposal goes on from there. The head's one-layer cache is indexed by the
target's pages, like a draft model's (`draft_model.py`). Positions the target never ran for a request (a
prefix-cache hit) have no features here: the head trusts the K/V an earlier request with the same
tokens left in those shared pages, which only the acceptance rate depends on.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from tessera.engine.batch import Row, build_rows
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import chain


@dataclass
class _Next:
    """What the head's row at a request's last cached position gave: its first draft and the feature of
    the draft step after it, valid while the request's cached length is `num_cached`."""

    num_cached: int
    token: int
    feature: torch.Tensor  # [1, hidden]


class EagleProposer:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._next: weakref.WeakKeyDictionary[Sequence, _Next] = weakref.WeakKeyDictionary()

    @torch.no_grad()
    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], target: ModelRunner) -> None:
        hidden, forward = target.last_hidden, target.last_batch
        assert hidden is not None and forward is not None
        rows: list[Row] = []
        feats: list[torch.Tensor] = []
        seqs: list[Sequence] = []
        for (seq, n), start, last in zip(work, starts, forward.last_rows.tolist(), strict=True):
            if seq.finished:
                self._next.pop(seq, None)
                continue
            keep = min(n, seq.num_cached - start)  # a verify's rejected drafts are past num_cached
            if keep <= 0:
                continue
            # positions start .. num_cached - 1, each with the token after it
            rows.append((seq.tokens(start + 1, seq.num_cached + 1), start, seq.pages))
            feats.append(hidden[last - n + 1 : last - n + 1 + keep])
            seqs.append(seq)
        if not rows:
            return
        tokens, outputs = self._step(rows, feats)
        for j, seq in enumerate(seqs):
            self._next[seq] = _Next(seq.num_cached, tokens[j], outputs[j : j + 1])

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        rows: list[Row] = []
        feats: list[torch.Tensor] = []
        chained: list[int] = []
        for i, (seq, room) in enumerate(zip(seqs, rooms, strict=True)):
            nxt = self._next.get(seq)
            if nxt is None or nxt.num_cached != seq.num_cached:
                continue  # the head has not run this request's last position: no draft this step
            drafts[i].append(nxt.token)
            if room > 1:
                rows.append(([nxt.token], seq.num_cached, seq.pages))
                feats.append(nxt.feature)
                chained.append(i)
        if rows:
            more = chain.draft(self.runner, rows, [rooms[i] - 1 for i in chained], torch.cat(feats))
            for i, tokens in zip(chained, more, strict=True):
                drafts[i] += tokens
        return drafts

    def _step(self, rows: list[Row], feats: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        """One head forward -> each row's next token and the head's output at its last position (the
        feature of its next step), in `rows`' order."""
        batch = build_rows(rows, self.runner.page_size, self.runner.device)
        logits = self.runner.forward(batch, features=self._in_batch_order(batch.last_rows, rows, feats))
        hidden = self.runner.last_hidden
        assert hidden is not None
        outputs = hidden[batch.logits_indices]  # a copy: graph memory moves on
        return logits.argmax(dim=-1).tolist(), outputs

    @staticmethod
    def _in_batch_order(last_rows: np.ndarray, rows: list[Row], feats: list[torch.Tensor]) -> torch.Tensor:
        """The features of `rows` laid out as `build_rows` laid out their tokens (short rows first)."""
        out = feats[0].new_empty(sum(len(r[0]) for r in rows), feats[0].shape[-1])
        for (tokens, _, _), f, last in zip(rows, feats, last_rows.tolist(), strict=True):
            out[last - len(tokens) + 1 : last + 1] = f
        return out
