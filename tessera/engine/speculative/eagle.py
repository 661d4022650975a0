"""EAGLE drafting (EAGLE-1/2 chain, top-k 1): a one-layer head over the target's hidden states.

The head's row at position i takes token i + 1 and the target's feature (final hidden state) at
position i, and predicts token i + 2; each later draft step takes the draft token just proposed and the
head's own output as its feature. So the head must first run every position the target ran since its
last proposal — with the target's features — and only then draft: its K/V at positions drafted from
its own features is rewritten from the target's at the next proposal (EAGLE's "stable" K/V).

The target's features come from each target forward (`observe`): the rows of the positions it kept —
a prefill chunk's, a verify's last token and accepted drafts. The head's one-layer cache is indexed by
the target's pages, like a draft model's (`draft_model.py`). Positions the target never ran for a
request (a prefix-cache hit) have no features here: the head trusts the K/V an earlier request with
the same tokens left in those shared pages, which only the acceptance rate depends on.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from tessera.engine.batch import Row, build_rows
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sequence import Sequence


@dataclass
class _Features:
    start: int  # the position of the first row
    rows: list[torch.Tensor]  # [n, hidden] each, consecutive positions

    @property
    def end(self) -> int:
        return self.start + sum(r.shape[0] for r in self.rows)


class EagleProposer:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._features: weakref.WeakKeyDictionary[Sequence, _Features] = weakref.WeakKeyDictionary()

    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], hidden: torch.Tensor,
                last_rows: list[int]) -> None:  # fmt: skip
        """After a target forward of `work` (each sequence's first position in `starts`, its last row of
        `hidden` in `last_rows`) and its postprocess: keep the features of the positions each sequence
        kept (a verify's rejected drafts are past its cached length now)."""
        for (seq, n), start, last in zip(work, starts, last_rows, strict=True):
            if seq.finished:
                self._features.pop(seq, None)
                continue
            keep = min(n, seq.num_cached - start)
            if keep <= 0:
                continue
            rows = hidden[last - n + 1 : last - n + 1 + keep].clone()
            known = self._features.get(seq)
            if known is None or known.end != start:  # new, or recomputed after a preemption
                self._features[seq] = _Features(start, [rows])
            else:
                known.rows.append(rows)

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        rows: list[Row] = []
        feats: list[torch.Tensor] = []
        active: list[int] = []
        for i, seq in enumerate(seqs):
            known = self._features.get(seq)
            if known is None or known.end != seq.num_cached or known.end == known.start:
                continue  # nothing the target ran since the last proposal: no draft this step
            # positions start .. num_cached - 1, each with the token after it
            rows.append((seq.tokens(known.start + 1, seq.num_cached + 1), known.start, seq.pages))
            feats.append(torch.cat(known.rows) if len(known.rows) > 1 else known.rows[0])
            active.append(i)
            self._features[seq] = _Features(seq.num_cached, [])  # the head runs them now
        while rows:
            batch = build_rows(rows, self.runner.page_size, self.runner.device)
            logits = self.runner.forward(batch, features=self._in_batch_order(batch.last_rows, rows, feats))
            hidden = self.runner.last_hidden
            assert hidden is not None
            last = torch.from_numpy(batch.last_rows).to(hidden.device)
            outputs = hidden[last]  # each row's feature for its next step
            tokens = logits.argmax(dim=-1).tolist()
            step_rows: list[Row] = []
            step_feats: list[torch.Tensor] = []
            step_active: list[int] = []
            for j, (i, token, (ran, start, pages)) in enumerate(zip(active, tokens, rows, strict=True)):
                drafts[i].append(token)
                if len(drafts[i]) < rooms[i]:
                    step_rows.append(([token], start + len(ran), pages))
                    step_feats.append(outputs[j : j + 1])
                    step_active.append(i)
            rows, feats, active = step_rows, step_feats, step_active
        return drafts

    @staticmethod
    def _in_batch_order(last_rows: np.ndarray, rows: list[Row], feats: list[torch.Tensor]) -> torch.Tensor:
        """The features of `rows` laid out as `build_rows` laid out their tokens (short rows first)."""
        out = feats[0].new_empty(sum(len(r[0]) for r in rows), feats[0].shape[-1])
        for (tokens, _, _), f, last in zip(rows, feats, last_rows.tolist(), strict=True):
            out[last - len(tokens) + 1 : last + 1] = f
        return out
