"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streaming or not),
/v1/models, /health and Prometheus /metrics.

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and belongs to its own
request: one request's bad text, parameters or length never fails another's. A request's work is bounded
before it is done: its body size, its prompt's characters against the context (before tokenizing), its
choices, stop strings and logprobs (`protocol.py`).

A request the engine fails (a failed step, or the engine process's death) gets a 500 in that shape, or,
streaming, an `{"error": ...}` event that OpenAI's clients raise; it counts as `failed` in the metrics.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from functools import cached_property
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tessera.engine.sampling import SamplingParams
from tessera.server import responses
from tessera.server.engine_loop import AsyncEngine, Handle, Update
from tessera.server.errors import ApiError, BodyLimit, error_response, install_error_handlers
from tessera.server.metrics import metrics_response
from tessera.server.protocol import ChatRequest, CompletionRequest
from tessera.server.tokenize import BatchEncoder, chars_per_token_bound

# NOTE: enough for a long-context prompt many times over (128k tokens is ~0.5 MB of text, ~1 MB of ids);
# a 50 MB body used to be parsed and tokenized whole (~57 s, ~1 GiB) before its length was refused.
MAX_BODY_BYTES = 16 * 2**20


def create_app(
    engine: AsyncEngine, model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The app over a started engine process (`AsyncEngine.start`); shutting the app down stops it.
    With `api_key`, the /v1 routes want `Authorization: Bearer <api_key>` (/health and /metrics do not).
    Requests name `model_name` (or no model); a body over `max_body_bytes` is refused (413) unread."""

    encoder = BatchEncoder(engine.tokenizer)
    prompts = _Prompts(engine, encoder)
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorized(request: Request) -> None:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not secrets.compare_digest(given, expected):
                raise ApiError(401, "invalid or missing API key: send Authorization: Bearer <key>", None,
                               kind="authentication_error")  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _ = prompts.max_chars  # a pass over the vocabulary, done before the first request waits on it
        yield
        encoder.close()
        engine.shutdown()

    app = FastAPI(title="tessera", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.engine, app.state.encoder = engine, encoder
    install_error_handlers(app)
    v1 = [Depends(authorized)]

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response(503, "the engine process is not running", None, kind="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "tessera"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return metrics_response(app.state.engine)

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(body.model, model_name)
        params = _params(body, prompts.vocab_size)
        ids = await prompts.batch(body.prompt)
        kind = "text_completion"
        return await _serve(app.state.engine, request, ids, params, body.stream, kind, model_name)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatRequest, request: Request) -> Response:
        _check_model(body.model, model_name)
        params = _params(body, prompts.vocab_size)
        prompts.check_chars(sum(len(m.content) for m in body.messages), "messages", "messages")
        try:
            text = engine.tokenizer.apply_chat_template([m.for_template() for m in body.messages])
        except Exception as exc:  # a template may reject a conversation (raise_exception)
            raise ApiError(400, f"messages: {exc}", "messages") from exc
        ids = await prompts.tokens(text, "messages", "messages")
        kind = "chat.completion"
        return await _serve(app.state.engine, request, [ids], params, body.stream, kind, model_name)

    return app


class _Prompts:
    """Prompts to token ids within the model's context; too long is refused before any tokenizing."""

    def __init__(self, engine: AsyncEngine, encoder: BatchEncoder) -> None:
        self.engine, self.encoder = engine, encoder

    @cached_property
    def vocab_size(self) -> int:
        return self.engine.tokenizer.vocab_size

    @cached_property
    def max_len(self) -> int | None:
        return getattr(self.engine, "max_model_len", None)

    @cached_property
    def max_chars(self) -> int | None:
        return None if self.max_len is None else self.max_len * chars_per_token_bound(self.engine.tokenizer)

    def check_chars(self, chars: int, what: str, param: str) -> None:
        if self.max_chars is not None and chars > self.max_chars:
            limit = f"the model's context of {self.max_len} tokens"
            message = f"{what} has {chars} characters, more than {limit} can hold"
            raise ApiError(400, message, param, code="context_length_exceeded")

    async def batch(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """A completions request's prompts, tokenized together; a refused one named by its index."""
        names = [f"prompt {i}" for i in range(len(prompts))] if len(prompts) > 1 else ["prompt"]
        jobs = [self.tokens(p, what, "prompt") for p, what in zip(prompts, names, strict=True)]
        return list(await asyncio.gather(*jobs))

    async def tokens(self, prompt: str | list[int], what: str, param: str) -> list[int]:
        if isinstance(prompt, str):
            self.check_chars(len(prompt), what, param)
            try:
                ids = await self.encoder.encode(prompt)
            except Exception as exc:  # this prompt's alone (BatchEncoder), and not the client's fault
                self.engine.requests["failed"] += 1  # the server's failure: counted with the engine's
                message = f"{what}: the tokenizer failed ({type(exc).__name__}: {exc})"
                raise ApiError(500, message, param, kind="server_error") from exc
        else:
            _check_ids(prompt, self.vocab_size, param)
            ids = list(prompt)
        if self.max_len is not None and len(ids) >= self.max_len:  # the engine's own check, before it
            raise ApiError(400, f"{what} has {len(ids)} tokens; the model's context is {self.max_len}",
                           param, code="context_length_exceeded")  # fmt: skip
        return ids


def _check_model(asked: str | None, served: str) -> None:
    if asked is not None and asked != served:
        raise ApiError(404, f"the model `{asked}` does not exist; this server serves `{served}`", "model",
                       code="model_not_found")  # fmt: skip


def _check_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    if not all(0 <= t < vocab_size for t in ids):
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab_size})", param)


def _params(body: CompletionRequest | ChatRequest, vocab_size: int) -> list[SamplingParams]:
    """The sampling parameters of each of a prompt's `n` choices."""
    _check_ids(body.stop_token_ids or (), vocab_size, "stop_token_ids")
    try:
        return body.params()
    except ValueError as exc:  # what pydantic cannot check alone (min_tokens > max_tokens)
        field = str(exc).split()[0]
        raise ApiError(400, str(exc), field if field in type(body).model_fields else None) from exc


async def _serve(
    engine: AsyncEngine, request: Request, prompts: list[list[int]], params: list[SamplingParams],
    stream: bool, kind: str, model: str,
) -> Response:  # fmt: skip
    """Run every choice of every prompt: choice `index` is prompt * n + choice, as OpenAI numbers them."""
    handles = await _submit(engine, prompts, params, "prompt" if kind == "text_completion" else "messages")
    per_choice = [p for _ in prompts for p in params]
    prompt_lens = [len(p) for p in prompts]
    rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if stream:
        events = _stream(engine, handles, rid, created, kind, model, prompt_lens, per_choice)
        return StreamingResponse(events, media_type="text/event-stream")
    finals = await _wait(engine, request, handles)
    if finals is None:
        return Response(status_code=499)
    failed = next((u for u in finals if u.finish_reason == "error"), None)
    if failed is not None:
        return error_response(500, failed.error or "the engine failed", None, kind="server_error")
    choices = [responses.choice(kind, i, u, per_choice[i], engine.tokenizer) for i, u in enumerate(finals)]
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
            "usage": responses.usage(prompt_lens, finals)}  # fmt: skip
    spec = responses.speculative(finals)
    return JSONResponse(body if spec is None else {**body, "speculative": spec})


async def _submit(
    engine: AsyncEngine, prompts: list[list[int]], params: list[SamplingParams], param: str
) -> list[Handle]:
    """All choices into the engine, or none: a refused one takes back the others."""
    jobs = [engine.submit(ids, p) for ids in prompts for p in params]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    handles = [r for r in results if isinstance(r, Handle)]
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is None:
        return handles
    for h in handles:
        engine.abort(h)
    if isinstance(failed, ValueError):  # the engine's checks
        raise ApiError(400, str(failed), param)
    if isinstance(failed, RuntimeError):  # the engine process is gone
        raise ApiError(503, str(failed), None, kind="server_error")
    raise failed


async def _final(handle: Handle) -> Update:
    while (update := await handle.next()).finish_reason is None:
        pass
    return update


async def _wait(engine: AsyncEngine, request: Request, handles: list[Handle]) -> list[Update] | None:
    """Final updates of all choices; None (requests aborted, pages freed) if the client went away."""
    everything = asyncio.ensure_future(asyncio.gather(*(_final(h) for h in handles)))
    while not everything.done():
        await asyncio.wait({everything}, timeout=0.5)
        if not everything.done() and await request.is_disconnected():
            everything.cancel()
            for h in handles:
                engine.abort(h)
            return None
    return list(everything.result())


async def _stream(
    engine: AsyncEngine, handles: list[Handle], rid: str, created: int, kind: str, model: str,
    prompt_lens: list[int], params: list[SamplingParams],
) -> AsyncIterator[str]:  # fmt: skip
    sent = [""] * len(handles)
    finals: dict[int, Update] = {}
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    try:
        if kind == "chat.completion":
            for i in range(len(handles)):
                first = {"index": i, "delta": {"role": "assistant"}}
                yield responses.sse(rid, created, model, chunk_kind, [first])
        async with aclosing(_updates(handles)) as updates:
            async for i, u in updates:
                if u.finish_reason == "error":  # the other choices are aborted below
                    yield responses.sse_error(u.error or "the engine failed")
                    yield "data: [DONE]\n\n"
                    return
                delta, sent[i] = u.text[len(sent[i]) :], u.text
                if u.finish_reason is not None:
                    finals[i] = u
                # NOTE: a chunk for every wake-up, also when its text is held back (a partial UTF-8
                # sequence, a token the tokenizer cannot spell): clients time tokens by chunks. A
                # stream that fell behind gets all its new tokens in one chunk (Handle.next coalesces).
                choice: dict[str, Any] = {"index": i, "finish_reason": u.finish_reason}
                if kind == "chat.completion":
                    choice["delta"] = {"content": delta} if delta else {}
                else:
                    choice["text"] = delta
                if params[i].logprobs:  # this chunk's tokens
                    choice["logprobs"] = responses.logprobs(
                        kind, u.new_token_ids, u.new_logprobs, u.new_top_logprobs, params[i], engine.tokenizer
                    )
                yield responses.sse(rid, created, model, chunk_kind, [choice])
        done = [finals[i] for i in sorted(finals)]
        spec = responses.speculative(done)
        extra = {"usage": responses.usage(prompt_lens, done)} | ({"speculative": spec} if spec else {})
        yield responses.sse(rid, created, model, chunk_kind, [], **extra)
        yield "data: [DONE]\n\n"
    finally:  # finished, or the client disconnected: abort whatever still runs
        for i, h in enumerate(handles):
            if i not in finals:
                engine.abort(h)


async def _updates(handles: list[Handle]) -> AsyncIterator[tuple[int, Update]]:
    """(choice index, update) as they come, until every choice has finished."""
    if len(handles) == 1:  # the common case needs no tasks
        while True:
            u = await handles[0].next()
            yield 0, u
            if u.finish_reason is not None:
                return
    pending = {asyncio.ensure_future(h.next()): i for i, h in enumerate(handles)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                u = future.result()
                yield i, u
                if u.finish_reason is None:
                    pending[asyncio.ensure_future(handles[i].next())] = i
    finally:
        for future in pending:
            future.cancel()
