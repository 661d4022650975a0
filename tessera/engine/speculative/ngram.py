"""NGRAM (prompt lookup) drafting: the continuation of the longest recent n-gram match in a request's own
tokens. No model: the request's prompt and output are searched on the host. It pays off where outputs
repeat their input — rewriting, correcting or editing a text or code — and costs ~nothing elsewhere."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np

from tessera.engine.sequence import Sequence

if TYPE_CHECKING:
    import torch

    from tessera.engine.batch import ScheduledBatch
    from tessera.engine.model_runner import ModelRunner

# tokens searched back from the end of a request: bounds the host work per request and step
SEARCH_WINDOW = 4096


class _Tokens:
    """A request's tokens as a growing int64 array: each step appends what is new, instead of building
    the search window from Python lists again (a 4k-token window cost ~80 us a request and step)."""

    def __init__(self, seq: Sequence) -> None:
        self.array = np.asarray(seq.token_ids, dtype=np.int64)
        self.size = self.array.size

    def update(self, seq: Sequence) -> np.ndarray:
        total, outputs = seq.num_tokens, seq.output_token_ids
        prompt = total - len(outputs)
        if total < self.size or (
            self.size > prompt and outputs[self.size - prompt - 1] != self.array[self.size - 1]
        ):
            # taken back (a rollback): start over
            self.array, self.size = np.asarray(seq.token_ids, dtype=np.int64), total
        elif total > self.size:
            if total > self.array.size:
                grown = np.empty(max(total, 2 * self.array.size), dtype=np.int64)
                grown[: self.size] = self.array[: self.size]
                self.array = grown
            self.array[self.size : total] = outputs[self.size - prompt :]
            self.size = total
        return self.array[: self.size]


class NgramProposer:
    def __init__(self, min_match: int = 1, max_match: int = 12, window: int = SEARCH_WINDOW) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"n-gram match windows need 1 <= min <= max, got {min_match} and {max_match}")
        self.min_match, self.max_match, self.window = min_match, max_match, window
        self._tokens: weakref.WeakKeyDictionary[Sequence, _Tokens] = weakref.WeakKeyDictionary()

    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]]:
        drafts = []
        for seq, k in zip(seqs, rooms, strict=True):
            known = self._tokens.get(seq)
            if known is None:
                known = self._tokens[seq] = _Tokens(seq)
            tokens = known.update(seq)
            drafts.append(self.draft(tokens[max(0, tokens.size - self.window) :], k))
        return drafts

    def follow(self, batch: ScheduledBatch, target: ModelRunner, choices: torch.Tensor) -> None:
        pass

    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], target: ModelRunner) -> None:
        pass  # nothing of the target's forward to follow

    def draft(self, tokens: list[int] | np.ndarray, k: int) -> list[int]:
        """Up to `k` tokens that followed an earlier occurrence of the longest suffix of `tokens` (between
        `min_match` and `max_match` tokens long) that occurred before — the latest occurrence with `k`
        tokens after it, else the latest — or [] if none did."""
        if k < 1 or len(tokens) < self.min_match + 1:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        last = len(arr) - 1
        # NOTE: candidates are the earlier positions whose token equals the last one; each is extended
        # backwards while it keeps matching — O(length + candidates * max_match), not O(length * n)
        ends = np.flatnonzero(arr[:last] == arr[last])
        if ends.size == 0:
            return []
        length = np.ones(ends.size, dtype=np.int64)
        alive = np.ones(ends.size, dtype=bool)
        for back in range(1, self.max_match):
            pos = ends - back
            ok = alive & (pos >= 0)
            ok[ok] = arr[pos[ok]] == arr[last - back]
            if not ok.any():
                break
            length += ok
            alive = ok
        best = int(length.max())
        if best < self.min_match:
            return []
        # NOTE: the latest match that fills the room: in a copied text the latest is often the copy's
        # own last tokens, with too few after them to use a long room (docs/gpu.md, fifteenth session)
        longest = ends[length == best]
        full = longest[longest + k <= last]
        end = int(full[-1] if full.size else longest[-1])
        return arr[end + 1 : end + 1 + k].tolist()
