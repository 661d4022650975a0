"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, per-request seeds,
presence / frequency (OpenAI's) and repetition (CTRL's, as vLLM and SGLang) penalties, and the most likely
alternatives' log-probabilities (OpenAI's top_logprobs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# NOTE: a temperature this small samples the argmax anyway, and dividing logits by a much smaller one
# overflows to inf (NaN probabilities): one such request failed every request of its batch. vLLM's
# threshold.
GREEDY_BELOW = 1e-5
# Penalized logits are clamped to this magnitude, so that dividing by any temperature >= GREEDY_BELOW
# stays finite (a repetition penalty of 1e-300 made a positive logit inf).
_LOGIT_BOUND = 1e30


# a sampled token's most likely alternatives: ((token id, log-probability), ...), most likely first
TopLogprobs = tuple[tuple[int, float], ...]


@dataclass
class Verified:
    """What one sampling sequence takes from a forward: one token, or for a verify its accepted draft
    tokens and then the target's own (so len(tokens) - 1 drafts were accepted); each token's
    log-probability under the model, and its alternatives where asked (`()` otherwise)."""

    tokens: list[int]
    logprobs: list[float]
    tops: list[TopLogprobs]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    min_tokens: int = 0  # EOS and stop tokens are not sampled before this many (stop strings still apply)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # this many most likely tokens' log-probabilities with each sampled one
    presence_penalty: float = 0.0  # subtracted from a token's logit once it is in the output
    frequency_penalty: float = 0.0  # subtracted once for each time it is in the output
    repetition_penalty: float = 1.0  # divides a positive logit, multiplies a negative one, of a token in
    # the prompt or the output (1 = off)
    extra: dict[str, object] = field(default_factory=dict, hash=False, compare=False)
    # greedy with no penalty: the sampler's common case, read per row every step, so set once here
    plain: bool = field(init=False, repr=False, compare=False, default=True)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "plain", self.greedy and not self.penalized)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    history: tuple[list[int], list[int]] = ([], []),
) -> tuple[int, float]:
    """One token from one row of logits [V]; returns (token, its log-probability under the model)."""
    tokens, logprobs, _ = sample_batch(logits[None], [params], [generator], [history])
    return tokens[0], logprobs[0]


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]] | None = None,
    banned: list[tuple[int, ...]] | None = None,
    before_copy: Callable[[torch.Tensor], None] | None = None,
) -> tuple[list[int], list[float], list[TopLogprobs]]:
    """A token for every row of logits [B, V], its log-probability under the model (before any
    penalty), and the `top_logprobs` most likely alternatives of the rows that ask for them (`()` for
    the others). `histories`: each row's (prompt, output) token ids, needed by rows with penalties;
    `banned`: token ids a row may not take now (EOS and stop tokens before `min_tokens`);
    `before_copy`: called with the tokens on the device before the host waits for them.

    Greedy rows take one batched argmax; only rows that sample or are penalized run their own code.
    Everything stays on the device until the one copy back at the end: a per-row `.item()` costs a sync
    each, which at a few hundred running requests was most of a decode step's host time."""
    tokens = torch.argmax(logits, dim=-1)
    wants_top: list[int] = []  # rows that asked for top_logprobs
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.top_logprobs:
            wants_top.append(i)
        ban = banned[i] if banned is not None else ()
        if p.plain and not ban:  # the common case: nothing per row (a view costs ~1 µs)
            continue
        row = logits[i]
        if p.penalized:
            if histories is None:
                raise ValueError("penalties need each row's prompt and output token ids (histories)")
            row = penalize(row, p, *histories[i])
        if ban:
            row = row.float().index_fill(0, torch.tensor(ban, device=row.device), float("-inf"))
        tokens[i] = row.argmax() if p.greedy else sample_row(row, p, gen)
    if before_copy is not None:
        before_copy(tokens)
    all_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    logprobs = all_logprobs.gather(1, tokens[:, None])[:, 0]
    both = torch.stack((tokens.to(torch.float64), logprobs.to(torch.float64))).tolist()
    tops: list[TopLogprobs] = [()] * len(params)
    if wants_top:
        top_logprobs(tops, all_logprobs, wants_top, [params[i].top_logprobs for i in wants_top])
    return [int(t) for t in both[0]], both[1], tops


def top_logprobs(tops: list[TopLogprobs], all_logprobs: torch.Tensor, rows: list[int], ks: list[int]) -> None:
    """`tops[i]` for each row i in `rows`: its `ks[j]` most likely tokens. One top-k over those rows alone
    and one more copy back, paid only by steps with such a row."""
    k = min(max(ks), all_logprobs.shape[-1])
    values, ids = all_logprobs[rows].topk(k, dim=-1)  # [R, k] each
    both = torch.stack((ids.to(torch.float64), values.to(torch.float64))).tolist()  # ids exact below 2^53
    for j, (i, want) in enumerate(zip(rows, ks, strict=True)):
        tops[i] = tuple((int(t), v) for t, v in zip(both[0][j][:want], both[1][j][:want], strict=True))


def penalize(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """One row's logits [V] (float32) with the penalties applied. NOTE: the history goes to the device on
    every step (a copy, O(prompt + output) host work): only penalized requests pay it, and the step
    waits for its logits at the end of sampling anyway."""
    row = logits.float().clone()
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=row.device)
        values = row[seen]
        rp = params.repetition_penalty
        row[seen] = torch.where(values > 0, values / rp, values * rp)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, device=row.device), minlength=row.numel())[: row.numel()]
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return row.clamp_(-_LOGIT_BOUND, _LOGIT_BOUND)


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """One draw from one row of logits [V] (a 0-d tensor on the device)."""
    return torch.multinomial(probabilities(logits, params), 1, generator=generator)[0]


def position_seed(seed: int, position: int) -> int:
    """The seed of a seeded request's draw at `position`: a splitmix64 mix of both, so neighbouring
    seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


_MASK64, _MASK63 = (1 << 64) - 1, (1 << 63) - 1


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampling (temperature > 0) row draws from: logits [..., V] (penalties and bans
    applied already) through temperature, top-k, min-p and top-p, normalized."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_k:
        kth = torch.topk(probs, min(params.top_k, probs.shape[-1]), dim=-1).values[..., -1:]
        probs = torch.where(probs < kth, 0.0, probs)
    if params.min_p:
        probs = torch.where(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0, probs)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # NOTE: keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = sorted_probs.cumsum(-1) - sorted_probs > params.top_p * sorted_probs.sum(-1, keepdim=True)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)
