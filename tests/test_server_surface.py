"""The server's OpenAI surface beyond tests/test_server.py (issue 19): one bad request never fails its
neighbours, a request's work is bounded before it is done, the shapes OpenAI clients send are served (content
parts, the developer role, batched prompts, top_logprobs), what tessera cannot do yet is refused by name,
and every error has OpenAI's body (CPU, SmolLM2)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from tessera.engine.sampling import SamplingParams, sample_batch
from tessera.server.engine_loop import AsyncEngine
from tessera.server.tokenize import chars_per_token_bound

from .server_harness import serving

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "smollm2"
BODY_LIMIT = 1 << 20  # small, so that a body over it is cheap to send
PROMPT = "The capital of France is"


class Server:
    def __init__(self, url: str, engine: AsyncEngine, app: Any) -> None:
        self.url, self.engine, self.app = url, engine, app

    def post(self, path: str, body: dict[str, Any] | bytes, timeout: float = 60) -> httpx.Response:
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            return httpx.post(f"{self.url}{path}", content=body, headers=headers, timeout=timeout)
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def pages_back(self, timeout: float = 20.0) -> None:
        """Every KV page is free or held by the prefix cache once the engine is idle."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.engine.stats
            if not s["has_work"] and s["pages_free"] + s["pages_cached"] == s["pages_usable"]:
                return
            time.sleep(0.05)
        raise AssertionError(f"KV pages leaked: {self.engine.stats}")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    from tessera.server.api import create_app

    with serving(lambda engine: create_app(engine, MODEL, max_body_bytes=BODY_LIMIT)) as (url, engine, app):
        yield Server(url, engine, app)


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    server.pages_back()


def _refused(r: httpx.Response, status: int, param: str | None, mention: str = "") -> dict[str, Any]:
    """`r` is OpenAI's error body with this status and param (and a message that mentions `mention`)."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert mention.lower() in error["message"].lower(), error
    return error


def _complete(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": 3, "temperature": 0, **extra}


def _chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0, **extra}


SURROGATE_CHAT = b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 3}'
SURROGATE_PROMPT = b'{"prompt": ["fine", "bad \\udfff"], "max_tokens": 3}'


def test_good_requests_complete_beside_bad_ones_sent_with_them(server: Server) -> None:
    """Good and bad requests at once: each bad one gets its own 4xx naming its field, every good one a 200
    (odd but valid sampling parameters included, which once failed their whole engine step)."""
    good: list[tuple[str, dict[str, Any] | bytes]] = [
        ("/v1/completions", _complete(f"Count to {i}:")) for i in range(12)
    ]
    good += [("/v1/chat/completions", _chat(f"Say {w}")) for w in ("hi", "yes", "no")]
    good += [
        ("/v1/completions", _complete(PROMPT, temperature=1e-300)),  # its logits / T overflowed to inf
        ("/v1/completions", _complete(PROMPT, temperature=1.0, repetition_penalty=1e-300, seed=1)),
        ("/v1/completions", _complete(PROMPT, temperature=1.0, seed=2**63 - 1, n=2)),
    ]
    bad: list[tuple[str, dict[str, Any] | bytes, int, str | None]] = [
        ("/v1/chat/completions", SURROGATE_CHAT, 400, "messages.0.content"),
        ("/v1/completions", SURROGATE_PROMPT, 400, "prompt"),
        ("/v1/completions", _complete(PROMPT, stop=[""]), 400, "stop"),
        ("/v1/completions", _complete(PROMPT, seed=2**64), 400, "seed"),
        ("/v1/completions", _complete(PROMPT, model="gpt-4o"), 404, "model"),
        ("/v1/completions", _complete(PROMPT, stop_token_ids=[10**9]), 400, "stop_token_ids"),
        ("/v1/chat/completions", _chat([{"type": "image_url", "image_url": {"url": "x"}}]), 400,
         "messages.0.content"),
        ("/v1/chat/completions", _chat("hi", tools=[{"type": "function"}]), 400, "tools"),
    ]  # fmt: skip
    jobs = [(path, body) for path, body in good] + [(path, body) for path, body, _, _ in bad]
    order = list(range(len(jobs)))[::3] + list(range(len(jobs)))[1::3] + list(range(len(jobs)))[2::3]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {i: pool.submit(server.post, *jobs[i]) for i in order}
        answers = [futures[i].result() for i in range(len(jobs))]
    for (path, body), r in zip(good, answers[: len(good)], strict=True):
        assert r.status_code == 200, (path, body, r.text)
        assert all(c["finish_reason"] == "length" for c in r.json()["choices"]), r.text
    for (_, _, status, param), r in zip(bad, answers[len(good) :], strict=True):
        _refused(r, status, param)
    # together as alone: the bad requests changed nothing for the good ones
    for path, body in good[:2]:
        assert (
            server.post(path, body).json()["choices"] == answers[good.index((path, body))].json()["choices"]
        )
    server.pages_back()


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "mention"),
    [
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": }', 400, None, "JSON"),
        ("/v1/completions", _complete(PROMPT, seed=-(2**63) - 1), 400, "seed", ""),
        ("/v1/completions", _complete(PROMPT, stop=["."] * 17), 400, "stop", "at most 16"),
        ("/v1/completions", _complete(PROMPT, stop="x" * 257), 400, "stop", "256"),
        ("/v1/completions", _complete(PROMPT, n=17), 400, "n", ""),
        ("/v1/completions", {"prompt": ["a"] * 20, "n": 16}, 400, "prompt", "choices"),
        ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt", "prompt 1"),
        ("/v1/completions", _complete(PROMPT, logprobs=21), 400, "logprobs", ""),
        ("/v1/completions", _complete(PROMPT, best_of=2), 400, "best_of", "not supported"),
        ("/v1/completions", _complete(PROMPT, suffix="!"), 400, "suffix", "not supported"),
        ("/v1/completions", _complete(PROMPT, echo=True), 400, "echo", "not supported"),
        ("/v1/completions", _complete(PROMPT, logit_bias={"42": 5}), 400, "logit_bias", "not supported"),
        ("/v1/completions", _complete(PROMPT, max_tokens=4, min_tokens=5), 400, "min_tokens", "min_tokens"),
        ("/v1/chat/completions", _chat("hi", top_logprobs=3), 400, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", _chat("hi", logprobs=True, top_logprobs=21), 400, "top_logprobs", ""),
        ("/v1/chat/completions", _chat("hi", tool_choice="auto"), 400, "tool_choice", "not supported"),
        ("/v1/chat/completions", _chat("hi", functions=[{"name": "f"}]), 400, "functions", "not supported"),
        ("/v1/chat/completions", _chat("hi", function_call="auto"), 400, "function_call", "not supported"),
        (
            "/v1/chat/completions",
            _chat("hi", response_format={"type": "json_object"}),
            400,
            "response_format",
            "not supported",
        ),
        ("/v1/chat/completions", _chat([{"type": "input_audio"}]), 400, "messages.0.content", "input_audio"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "content": "x"}]},
            400,
            "messages.0.role",
            "",
        ),
        ("/v1/chat/completions", _chat("hi", model="other"), 404, "model", "other"),
    ],
)
def test_each_refusal_names_its_field_in_openais_error_shape(
    server: Server, path: str, body: dict[str, Any] | bytes, status: int, param: str | None, mention: str
) -> None:
    _refused(server.post(path, body), status, param, mention)


def test_unknown_routes_and_methods_answer_in_openais_error_shape(server: Server) -> None:
    _refused(httpx.get(f"{server.url}/v1/embeddings"), 404, None, "/v1/embeddings")
    r = httpx.get(f"{server.url}/v1/completions")
    _refused(r, 405, None, "GET")
    assert "POST" in r.headers["allow"]
    _refused(httpx.post(f"{server.url}/v1/models"), 405, None, "POST")


def test_fields_that_ask_for_nothing_are_accepted(server: Server) -> None:
    """The unsupported fields' empty values (what SDKs send by default) are not refused."""
    chat = _chat("hi", tools=[], tool_choice="none", functions=[], response_format={"type": "text"},
                 logit_bias={}, model=MODEL, stop=None)  # fmt: skip
    completion = _complete(PROMPT, best_of=1, echo=False, suffix=None, logit_bias=None, model=MODEL)
    assert server.post("/v1/chat/completions", chat).status_code == 200
    assert server.post("/v1/completions", completion).status_code == 200


def test_a_body_over_the_limit_is_refused_unread(server: Server) -> None:
    big = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
    _refused(server.post("/v1/completions", big), 413, None, "limit")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(
        f"{server.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    _refused(r, 413, None, "limit")
    assert server.post("/v1/completions", _complete(PROMPT)).status_code == 200


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(server: Server) -> None:
    encoder, engine = server.app.state.encoder, server.engine
    assert engine.max_model_len == 8192
    most = engine.max_model_len * chars_per_token_bound(engine.tokenizer)
    before = (encoder.batches, encoder.large)
    error = _refused(server.post("/v1/completions", _complete("x" * (most + 1))), 400, "prompt", "context")
    assert error["code"] == "context_length_exceeded"
    half = "y" * (most // 2 + 1)
    chat = {"messages": [{"role": "system", "content": half}, {"role": "user", "content": half}]}
    _refused(server.post("/v1/chat/completions", chat), 400, "messages", "context")
    assert (encoder.batches, encoder.large) == before  # neither was tokenized
    # counted in tokens: one prompt of a batch too long refuses the whole request, naming that prompt
    body = {"prompt": [PROMPT, "word " * 9000], "max_tokens": 2}
    _refused(server.post("/v1/completions", body), 400, "prompt", "prompt 1 has 9001 tokens")
    server.pages_back()


def test_content_parts_and_the_developer_role_read_as_text_and_system(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    as_parts = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Answer in one word."}]},
                  {"role": "user", "content": parts}],  # type: ignore[list-item]
        max_tokens=8, temperature=0,
    )  # fmt: skip
    as_text = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What is the capital\nof France?"}],
        max_tokens=8, temperature=0,
    )  # fmt: skip
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens  # type: ignore[union-attr]


def test_batched_prompts_get_a_choice_set_each_numbered_across_them(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "One, two, three,"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in prompts]
    texts = [a.choices[0].text for a in alone]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert out.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)  # type: ignore[union-attr]
    assert out.usage.completion_tokens == 16  # type: ignore[union-attr]
    streamed = [""] * 2
    chunks = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, stream=True)
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts


def test_batched_token_id_prompts_equal_their_texts(client: openai.OpenAI, server: Server) -> None:
    prompts = [PROMPT, "One, two, three,"]
    ids = [server.engine.tokenizer.encode(p) for p in prompts]
    by_text = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))  # type: ignore[union-attr]


def test_top_logprobs_are_the_models_most_likely_tokens(client: openai.OpenAI) -> None:
    """Greedy, so the sampled token is the most likely one: the first alternative is it, with its logprob;
    the alternatives come most likely first, and their probabilities sum to at most 1."""
    hi = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                          logprobs=True, top_logprobs=3)  # fmt: skip
    entries = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries and len(entries) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for e in entries:
        values = [a.logprob for a in e.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
    streamed = client.chat.completions.create(model=MODEL, messages=hi, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                              logprobs=True, top_logprobs=3, stream=True)  # fmt: skip
    tops = [[a.token for a in e.top_logprobs] for c in streamed if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content or []]  # fmt: skip
    assert tops == [[a.token for a in e.top_logprobs] for e in entries]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=5)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None and len(lp.top_logprobs) == 4
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):  # type: ignore[arg-type]
        assert len(top) == 5 and top[token] == pytest.approx(logprob) and max(top.values()) == top[token]
    none = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=0)
    assert none.choices[0].logprobs.top_logprobs is None  # type: ignore[union-attr]


def test_the_sampler_returns_top_logprobs_only_for_rows_that_ask() -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().repeat(3, 1)
    params = [
        SamplingParams(),
        SamplingParams(top_logprobs=3),
        SamplingParams(temperature=1.0, top_logprobs=9),
    ]
    tokens, logprobs, tops = sample_batch(logits, params, [None, None, torch.Generator().manual_seed(0)])
    assert tops[0] == ()
    assert [t for t, _ in tops[1]] == [0, 1, 2]
    assert [v for _, v in tops[1]] == pytest.approx(probs[:3].log().tolist())
    assert len(tops[2]) == 5  # all the vocabulary there is
    assert logprobs[2] == pytest.approx(math.log(probs[tokens[2]].item()))


def test_a_tiny_temperature_or_repetition_penalty_samples_without_failing_the_batch() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0]]).repeat(3, 1)
    params = [SamplingParams(), SamplingParams(temperature=1e-300),
              SamplingParams(temperature=1.0, repetition_penalty=1e-300)]  # fmt: skip
    gens = [None, None, torch.Generator().manual_seed(0)]
    tokens, logprobs, _ = sample_batch(logits, params, gens, [([0, 1], [])] * 3)
    assert tokens[:2] == [0, 0] and tokens[2] in (0, 1) and all(math.isfinite(p) for p in logprobs)
