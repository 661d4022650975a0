"""Streaming text of a growing token list, decoding only a window at its end.

NOTE: decoding all of a request's tokens on every update costs O(length) each time, O(length²) a stream
(~90 µs an update at 1,024 tokens): at 256 streams the HTTP side fell behind and sent several tokens a
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

    def text(self, ids: list[int], final: bool = False) -> str:
        if final:
            return output_text(self.tokenizer, ids, self.params, self.eos)
        end = len(ids) - (1 if ids and ids[-1] in self.eos and not self.params.ignore_eos else 0)
        if end > self._read:
            window = ids[self._start : end]
            context = self.tokenizer.decode(window[: self._read - self._start])
            full = self.tokenizer.decode(window)
            if len(full) > len(context) and not full.endswith(_HELD):
                self._text += full[len(context) :]
                self._start, self._read = self._read, end
        return cut_at_stop(self._text, self.params.stop)
