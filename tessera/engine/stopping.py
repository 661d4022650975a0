"""When a request stops: EOS, stop tokens, stop strings, `max_tokens`, the model's context; and which
tokens it may not sample yet (`min_tokens`)."""

from __future__ import annotations

from tessera.engine.detokenize import IncrementalDetokenizer
from tessera.engine.sequence import Sequence
from tessera.loader.tokenizer import Tokenizer


class StopChecker:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len

    def check(self, seq: Sequence) -> str | None:
        """Why `seq` stops after its last token: "stop" (EOS, a stop token or string), "length"
        (`max_tokens` or the model's context), or None."""
        token, p = seq.output_token_ids[-1], seq.params
        eos = token in self.eos_token_ids and not p.ignore_eos
        if eos or token in p.stop_token_ids or self._hit_stop_string(seq):
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def banned(self, seq: Sequence, ahead: int = 0) -> tuple[int, ...]:
        """Tokens `seq` may not sample now (or, in a verify, `ahead` tokens from now): its EOS and stop
        tokens until it has `min_tokens`."""
        p = seq.params
        if len(seq.output_token_ids) + ahead >= p.min_tokens:
            return ()
        return p.stop_token_ids + (() if p.ignore_eos else self.eos_token_ids)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # NOTE: incremental: decoding the whole output on every step made this O(length) a step for
        # each request with stop strings (60 µs at 1,024 tokens), on the engine loop between forwards
        if not seq.params.stop:
            return False
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params, self.eos_token_ids)
        return seq.detokenizer.hits_stop(seq.output_token_ids)
