"""NGRAM (prompt lookup) drafting: the continuation of the longest recent n-gram match in a request's own
tokens. No model: the request's prompt and output are searched on the host. It pays off where outputs
repeat their input — rewriting, correcting or editing a text or code — and costs ~nothing elsewhere."""

from __future__ import annotations

import numpy as np

from tessera.engine.sequence import Sequence

# tokens searched back from the end of a request: bounds the host work per request and step
SEARCH_WINDOW = 4096


class NgramProposer:
    def __init__(self, min_match: int = 1, max_match: int = 12, window: int = SEARCH_WINDOW) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"n-gram match windows need 1 <= min <= max, got {min_match} and {max_match}")
        self.min_match, self.max_match, self.window = min_match, max_match, window

    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]]:
        return [self.draft(seq.tokens(max(0, seq.num_tokens - self.window), seq.num_tokens), k)
                for seq, k in zip(seqs, rooms, strict=True)]  # fmt: skip

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
        (between `min_match` and `max_match` tokens long) that occurred before; [] if none did."""
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
        end = int(ends[np.flatnonzero(length == best)[-1]])  # the latest of the longest matches
        return arr[end + 1 : end + 1 + k].tolist()
