"""Streaming text of a growing token list, decoding only a window at its end (the HTTP side's streams, and
the engine's stop-string checks).

NOTE: decoding all of a request's tokens on every update costs O(length) each time, O(length²) a stream
(~60 µs an update at 1,024 tokens): at 256 streams the HTTP side fell behind and sent several tokens a
chunk. Here each update decodes the tokens since the last emitted text plus the few before them, for the
context a decoder needs (a leading space, a multi-byte character split over tokens), as vLLM's and HF's
streamers do.
"""

from __future__ import annotations

from tessera.engine.sampling import SamplingParams
from tessera.loader.tokenizer import Tokenizer

_HELD = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence: wait for the next token


def output_text(tokenizer: Tokenizer, ids: list[int], params: SamplingParams, eos: tuple[int, ...]) -> str:
    """The output text without a trailing EOS and cut at a stop string (streaming and final)."""
    if ids and ids[-1] in eos and not params.ignore_eos:
        ids = ids[:-1]
    return cut_at_stop(tokenizer.decode(ids), params.stop)


def cut_at_stop(text: str, stops: list[str] | tuple[str, ...]) -> str:
    for stop in stops:
        if stop in text:
            text = text[: text.index(stop)]
    return text


class IncrementalDetokenizer:
    """`text(ids)` for one request whose `ids` only ever grow between calls. Text held back while it
    ends in an incomplete character; `final=True` decodes everything once, exactly as `output_text`."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos: tuple[int, ...]) -> None:
        self.tokenizer, self.params, self.eos = tokenizer, params, eos
        self._text = ""  # the text of ids[:_read]
        self._start = 0  # the window's first token: decoded again, as context for the new ones
        self._read = 0
        self._scanned = 0  # text searched for stop strings by `hits_stop`

    def text(self, ids: list[int], final: bool = False) -> str:
        if final:
            return output_text(self.tokenizer, ids, self.params, self.eos)
        return cut_at_stop(self.update(ids), self.params.stop)

    def update(self, ids: list[int]) -> str:
        """The whole text of `ids` so far, not cut at stop strings (held back while it ends in half a
        character)."""
        end = len(ids) - (1 if ids and ids[-1] in self.eos and not self.params.ignore_eos else 0)
        if end > self._read:
            window = ids[self._start : end]
            context = self.tokenizer.decode(window[: self._read - self._start])
            full = self.tokenizer.decode(window)
            if len(full) > len(context) and not full.endswith(_HELD):
                self._text += full[len(context) :]
                self._start, self._read = self._read, end
        return self._text

    def hits_stop(self, ids: list[int]) -> bool:
        """Whether a stop string has appeared, searching only the text new since the last call (and a
        stop string's length before it, for one that straddles the two)."""
        stops = self.params.stop
        text = self.update(ids)
        longest = max(map(len, stops), default=0)
        tail = text[max(0, self._scanned - longest + 1) :]
        self._scanned = len(text)
        return any(stop in tail for stop in stops)
