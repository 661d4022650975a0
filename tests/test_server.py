"""The OpenAI-compatible server, live on localhost, driven by the official `openai` client (CPU, SmolLM2)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams
from tessera.server.engine_loop import AsyncEngine

from .server_harness import serving

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, AsyncEngine]]:
    from tessera.server.api import create_app

    with serving(lambda engine: create_app(engine, "smollm2")) as (url, engine, _):  # the engine process
        yield url, engine
    assert not engine._proc.is_alive()


@pytest.fixture
def client(server: tuple[str, AsyncEngine]) -> Iterator[openai.OpenAI]:
    url, engine = server
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    _assert_all_pages_back(engine)


def _assert_all_pages_back(engine: AsyncEngine, timeout: float = 20.0) -> None:
    """The engine process reports its pages on going idle: every page is free or held by the cache."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats
        if not s["has_work"] and s["pages_free"] + s["pages_cached"] == s["pages_usable"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"KV pages leaked: {engine.stats}")


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM(device="cpu")


def test_a_prompt_of_token_ids_equals_its_text(client: openai.OpenAI, reference: LLM) -> None:
    ids = reference.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completion_equals_offline_generate(client: openai.OpenAI, reference: LLM) -> None:
    out = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0)
    expected = reference.generate(PROMPT, SamplingParams(max_tokens=8))[0]
    assert out.choices[0].text == expected.text and out.choices[0].text.startswith(" Paris")
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids) and out.usage.completion_tokens == 8
    assert out.choices[0].finish_reason == "length"


def test_chat_streaming_and_not_give_the_same_text(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    pieces = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                            stream=True)  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == whole.choices[0].message.content and "Paris" in streamed
    assert whole.choices[0].finish_reason == "stop"  # <|im_end|>


def test_n_choices_stop_strings_and_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=16, temperature=1.0, n=3, seed=5
    )
    assert len(out.choices) == 3 and sorted(c.index for c in out.choices) == [0, 1, 2]
    stopped = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0, stop=["."], logprobs=1
    )
    choice = stopped.choices[0]
    assert choice.text == " Paris" and choice.finish_reason == "stop"
    assert choice.logprobs is not None and all(p <= 0 for p in choice.logprobs.token_logprobs)


def test_concurrent_requests_all_complete_like_sequential_ones(client: openai.OpenAI) -> None:
    prompts = [f"Count to {i}:" for i in range(12)]

    def ask(p: str) -> str:
        return (
            client.completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0).choices[0].text
        )

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, prompts))
    assert together == [ask(p) for p in prompts[:4]] + together[4:]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server: tuple[str, AsyncEngine]) -> None:
    url, engine = server
    cases = [
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"prompt": PROMPT, "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": [1, 10**9]}, "token ids"),
        ({"prompt": PROMPT, "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"prompt": []}, "prompt"),
        ({"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "word " * 9000, "max_tokens": 4}, "context"),
    ]
    for body, mention in cases:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and mention in error["message"], error
    r = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    ok = httpx.post(
        f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0}, timeout=60
    )
    assert ok.status_code == 200
    _assert_all_pages_back(engine)


def test_penalties_reach_the_sampler(client: openai.OpenAI) -> None:
    """Greedy with and without a frequency penalty (an OpenAI field) and a repetition penalty (vLLM's and
    SGLang's, sent as an extra field): the penalized outputs differ and repeat themselves less."""
    kwargs = {"model": "smollm2", "prompt": "la la la la la la la la", "max_tokens": 12, "temperature": 0}
    plain = client.completions.create(**kwargs, logprobs=1).choices[0]
    freq = client.completions.create(**kwargs, logprobs=1, frequency_penalty=2.0).choices[0]
    rep = client.completions.create(**kwargs, logprobs=1, extra_body={"repetition_penalty": 1.5}).choices[0]
    assert freq.text != plain.text and rep.text != plain.text
    distinct = [len(set(c.logprobs.tokens)) for c in (plain, freq, rep)]  # type: ignore[union-attr]
    assert distinct[1] >= distinct[0] and distinct[2] >= distinct[0], distinct


def test_stop_token_ids_and_min_tokens(client: openai.OpenAI, reference: LLM) -> None:
    """vLLM's extensions: a stop token ends the output where it is sampled; min_tokens keeps a chat answer
    that would end after a few tokens (EOS) going."""
    free = reference.generate([PROMPT], SamplingParams(max_tokens=8))[0]
    stop = free.token_ids[2]
    out = client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [stop]}
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 3  # type: ignore
    assert free.text.startswith(out.choices[0].text)
    hi = [{"role": "user", "content": "What is the capital of France?"}]
    short = client.chat.completions.create(model="smollm2", messages=hi, max_tokens=64, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 30  # type: ignore
    longer = client.chat.completions.create(
        model="smollm2", messages=hi, max_tokens=64, temperature=0, extra_body={"min_tokens": 40}
    )
    assert longer.usage.completion_tokens >= 40  # type: ignore[union-attr]
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)  # type: ignore


def test_client_disconnect_mid_stream_aborts_and_frees_pages(server: tuple[str, AsyncEngine]) -> None:
    url, engine = server
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # got the first token: hang up
    _assert_all_pages_back(engine)


def test_models_health_and_metrics(server: tuple[str, AsyncEngine]) -> None:
    url, _ = server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "smollm2"
    text = httpx.get(f"{url}/metrics").text
    for name in ("tessera_requests_total", "tessera_prompt_tokens_total", "tessera_kv_cache_usage",
                 "tessera_kv_cache_prefix_usage", "tessera_preemptions_total",
                 "tessera_prefix_cache_hit_rate", "tessera_num_requests_running"):  # fmt: skip
        assert name in text, name
    from tessera.bench.serve import engine_steps

    steps_before, _ = engine_steps(text)
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    deadline = time.monotonic() + 10  # the engine reports its counters on going idle
    while (steps := engine_steps(httpx.get(f"{url}/metrics").text))[0] < steps_before + 3:
        assert time.monotonic() < deadline, steps
        time.sleep(0.05)
    assert set(steps[1]) == {"schedule", "propose", "forward", "sample", "update"} and steps[1]["forward"] > 0
    # on a CPU every forward is eager, and counted as such
    text = httpx.get(f"{url}/metrics").text
    assert 'tessera_graph_eager_fallbacks_total{reason="disabled"}' in text
    # idle: the prefix cache keeps pages, but none is in use (they are evictable, not a leak)
    gauges = dict(line.split() for line in text.splitlines() if line.startswith("tessera_kv_cache"))
    assert float(gauges["tessera_kv_cache_usage"]) == 0.0
    assert float(gauges["tessera_kv_cache_prefix_usage"]) > 0
    assert gauges["tessera_kv_cache_evictable_usage"] == gauges["tessera_kv_cache_prefix_usage"]


def test_a_thousand_concurrent_short_requests(server: tuple[str, AsyncEngine]) -> None:
    import asyncio
    import resource

    from tessera.bench.serve import make_prompts, run_load, summarize

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))  # 2 sockets a request
    url, engine = server
    prompts = make_prompts(1000, 2, 6, seed=1)
    results, duration = asyncio.run(run_load(url, prompts, output_len=2, rate=float("inf"), concurrency=1000))
    report = summarize(results, duration)
    assert report["completed"] == 1000 and report["failed"] == 0, report["errors"]
    assert all(r.output_tokens == 2 for r in results)
    _assert_all_pages_back(engine)


def test_an_engine_failure_is_a_500_and_the_server_recovers(server: tuple[str, AsyncEngine]) -> None:
    url, engine = server
    engine.fail_next_step("injected kernel failure")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    ok = httpx.post(
        f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith(" Paris")
    _assert_all_pages_back(engine)


def test_cached_prompt_tokens_are_reported_per_request(server: tuple[str, AsyncEngine]) -> None:
    url, engine = server
    body = {"prompt": "Tell me about the sea. " * 8, "max_tokens": 2, "temperature": 0}
    first = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["usage"]
    second = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["usage"]
    page = 16  # whole pages of the first request's prompt are shared
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == first["prompt_tokens"] // page * page
    _assert_all_pages_back(engine)


def test_streamed_logprobs_match_the_whole_response(client: openai.OpenAI) -> None:
    """Streaming with logprobs: each chunk carries its tokens' (as text) log-probabilities; together they
    are the non-streamed response's, token for token."""
    whole = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    chunks = list(
        client.completions.create(
            model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, stream=True
        )
    )
    tokens, logprobs = [], []
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            tokens += c.choices[0].logprobs.tokens
            logprobs += c.choices[0].logprobs.token_logprobs
    assert whole.choices[0].logprobs is not None
    assert tokens == whole.choices[0].logprobs.tokens and len(tokens) == whole.usage.completion_tokens
    assert logprobs == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert "".join(tokens).startswith(whole.choices[0].text)  # token texts, not ids
    hi = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model="smollm2",
        messages=hi,
        max_tokens=4,
        logprobs=True,
        stream=True,  # type: ignore[arg-type]
    )
    entries = [e for c in chat if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) >= 1 and all(e.logprob <= 0 and e.token for e in entries)


def test_an_api_key_guards_the_v1_routes() -> None:
    """With --api-key, /v1 routes answer 401 (OpenAI's error shape) without the bearer key; /health stays
    open for load balancers. A stand-in engine: these routes never reach it."""
    from fastapi.testclient import TestClient

    from tessera.server.api import create_app

    engine = type("Engine", (), {"tokenizer": None, "alive": True, "shutdown": lambda self: None})()
    with TestClient(create_app(engine, "smollm2", api_key="s3cret")) as http:  # type: ignore[arg-type]
        assert http.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        ok = http.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "smollm2"


def test_a_burst_of_streaming_and_plain_requests_mixed(server: tuple[str, AsyncEngine]) -> None:
    """300 at once, every other one streamed: every one completes with all its tokens, and every KV page
    comes back."""
    import asyncio
    import json

    url, engine = server

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        if i % 2 == 0:
            r = await client.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["completion_tokens"]
        async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["usage"]["completion_tokens"]

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(300)))

    assert asyncio.run(burst()) == [4] * 300
    _assert_all_pages_back(engine)
