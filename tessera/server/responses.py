"""OpenAI's response bodies: a choice, log-probabilities with their alternatives, usage, and the
server-sent events of a stream (its error event included)."""

from __future__ import annotations

import json
from typing import Any

from tessera.engine.sampling import SamplingParams, TopLogprobs
from tessera.loader.tokenizer import Tokenizer
from tessera.server.engine_loop import Update


def choice(kind: str, index: int, u: Update, params: SamplingParams, tokenizer: Tokenizer) -> dict[str, Any]:
    lp = None
    if params.logprobs:
        lp = logprobs(kind, u.token_ids[: len(u.logprobs)], u.logprobs, u.top_logprobs, params, tokenizer)
    if kind == "text_completion":
        return {"index": index, "text": u.text, "logprobs": lp, "finish_reason": u.finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": u.text}, "logprobs": lp,
            "finish_reason": u.finish_reason}  # fmt: skip


def logprobs(
    kind: str,
    ids: list[int],
    logprobs: list[float],
    top_logprobs: list[TopLogprobs],
    params: SamplingParams,
    tokenizer: Tokenizer,
) -> dict[str, Any]:
    """The sampled tokens' log-probabilities in OpenAI's shape for `kind`, each token as its text, with
    the `params.top_logprobs` most likely alternatives at each (`top_logprobs`, one a token if asked)."""
    tokens = [spell(tokenizer, t) for t in ids]
    alternatives = top_logprobs if params.top_logprobs else [()] * len(ids)
    tops = [[(spell(tokenizer, t), p) for t, p in top] for top in alternatives]
    if kind == "text_completion":
        top_logprobs = [dict(top) for top in tops] if params.top_logprobs else None
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top_logprobs}
    return {"content": [{**entry(t, p), "top_logprobs": [entry(a, q) for a, q in top]}
                        for t, p, top in zip(tokens, logprobs, tops, strict=True)]}  # fmt: skip


def entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def spell(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def usage(prompt_lens: list[int], finals: list[Update]) -> dict[str, Any]:
    """Usage of a request whose choices (`finals`, prompt-major) are `len(finals) // len(prompt_lens)` a
    prompt; each prompt's tokens count once, however many choices it has (as OpenAI counts them)."""
    n = len(finals) // max(len(prompt_lens), 1)
    completion = sum(len(u.token_ids) for u in finals)
    # OpenAI's field for prompt caching: tokens of each prompt found in the prefix cache
    cached = sum(max((u.cached_tokens for u in finals[j * n : (j + 1) * n]), default=0)
                 for j in range(len(prompt_lens)))  # fmt: skip
    prompt = sum(prompt_lens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def speculative(finals: list[Update]) -> dict[str, Any] | None:
    """Speculative decoding's share of a response (beside `usage`, as SGLang's `meta_info` carries it):
    verify steps, draft tokens accepted, and the acceptance length (tokens a verify step emitted on
    average); None for a response without speculation."""
    verifies = sum(u.spec[0] for u in finals)
    if not verifies:
        return None
    accepted = sum(u.spec[1] for u in finals)
    return {"verify_steps": verifies, "accepted_draft_tokens": accepted,
            "acceptance_length": round((verifies + accepted) / verifies, 4)}  # fmt: skip


def sse(rid: str, created: int, model: str, kind: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"


def sse_error(message: str) -> str:
    """A failure after the stream's 200 went out: OpenAI's error body as an event (vLLM sends the same);
    the `openai` client raises `APIError` on a chunk with an `error` key."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n"
