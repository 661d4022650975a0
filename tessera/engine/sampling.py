"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    extra: dict[str, object] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, float]:
    """One token from one row of logits [V]; returns (token, its log-probability under the model)."""
    tokens, logprobs = sample_batch(logits[None], [params], [generator])
    return tokens[0], logprobs[0]


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[float]]:
    """A token for every row of logits [B, V], and its log-probability under the model.

    Greedy rows take one batched argmax; only rows that sample run their own filters. Everything stays
    on the device until the one copy back at the end: a per-row `.item()` costs a sync each, which at
    a few hundred running requests was most of a decode step's host time."""
    tokens = torch.argmax(logits, dim=-1)
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i], p, gen)
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
    both = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64))).tolist()
    return [int(t) for t in both[0]], both[1]


def _sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_k:
        kth = torch.topk(probs, min(params.top_k, probs.numel())).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if params.min_p:
        probs = torch.where(probs < params.min_p * probs.max(), 0.0, probs)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # NOTE: keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p * sorted_probs.sum()
        probs = probs.scatter(0, order[drop], 0.0)
    return torch.multinomial(probs / probs.sum(), 1, generator=generator)[0]
