"""A request's token state and its KV pages (changed by the scheduler alone)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tessera.engine.sampling import SamplingParams, TopLogprobs, position_seed

_ids = itertools.count()


@dataclass(eq=False)  # a request is itself: identity equality, hashable
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # if params.top_logprobs
    pages: list[int] = field(default_factory=list)
    prefix_nodes: list[Any] = field(default_factory=list)  # prefix-cache nodes whose pages lead `pages`
    num_cached: int = 0  # tokens whose K/V is in the cache
    # speculative decoding: the tokens proposed for this step's verify (they follow the last token, and
    # are no output until the target accepts them); verifies run and draft tokens accepted so far
    draft_token_ids: list[int] = field(default_factory=list)
    spec_verifies: int = 0
    spec_accepted: int = 0
    cached_prompt_tokens: int | None = None  # prompt tokens found in the prefix cache on admission
    finish_reason: str | None = None
    generator: Any = None  # torch.Generator of a seeded request (see `rng`)
    detokenizer: Any = None  # IncrementalDetokenizer of a request with stop strings (the engine's)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list; past the last token, the draft tokens."""
        total = self.num_tokens
        if end > total:
            return self.tokens(start, total) + self.draft_token_ids[: end - total]
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def rng(self, ahead: int = 0) -> Any:
        """The generator for the draw of the token at position num_tokens + ahead: None for an unseeded
        request (the global one), else this request's, seeded from its seed and that position. A seeded
        request's every token then depends on its seed and position alone, not on how many draws came
        before: the same tokens however it is batched or chunked, and with speculation or without (a
        verify draws at each drafted position exactly what plain decoding draws there)."""
        if self.generator is None:
            return None
        assert self.params.seed is not None
        return self.generator.manual_seed(position_seed(self.params.seed, self.num_tokens + ahead))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def uncached(self) -> int:
        """Tokens whose K/V is not in the cache yet: the prompt's tail, or the last sampled token."""
        return self.num_tokens - self.num_cached

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: float, top: TopLogprobs = ()) -> None:
        self.output_token_ids.append(token)
        self.output_logprobs.append(logprob)
        if self.params.top_logprobs:
            self.output_top_logprobs.append(top)

    def truncate(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens (the prompt is never cut: see KVManager.rollback)."""
        outputs = num_tokens - len(self.prompt_token_ids)
        assert 0 <= outputs <= len(self.output_token_ids)
        del (
            self.output_token_ids[outputs:],
            self.output_logprobs[outputs:],
            self.output_top_logprobs[outputs:],
        )
        self.detokenizer = None  # its window is past the new end: rebuilt on the next stop check
