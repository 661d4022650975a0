"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streaming or not),
/v1/models, /health and Prometheus /metrics."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tessera.loader.tokenizer import Tokenizer
from tessera.server.engine_loop import AsyncEngine, Handle, Update
from tessera.server.metrics import metrics_response
from tessera.server.protocol import ChatRequest, CompletionRequest
from tessera.server.tokenize import BatchEncoder


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app over a started engine process (`AsyncEngine.start`); shutting the app down stops it.
    With `api_key`, the /v1 routes want `Authorization: Bearer <api_key>` (/health and /metrics do not)."""

    encoder = BatchEncoder(engine.tokenizer)
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def authorized(request: Request) -> None:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not secrets.compare_digest(given, expected):
                raise _Unauthorized

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        encoder.close()
        engine.shutdown()

    app = FastAPI(title="tessera", lifespan=lifespan)
    app.state.engine = engine
    v1 = [Depends(authorized)]

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        return _error(401, "invalid or missing API key: send Authorization: Bearer <key>", None,
                      kind="authentication_error")  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return _error(503, "the engine process is not running", None, kind="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "tessera"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return metrics_response(app.state.engine)

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            params = [body.sampling(body.max_tokens, i, body.logprobs is not None) for i in range(body.n)]
        except ValueError as exc:  # what pydantic cannot check alone (min_tokens > max_tokens)
            return _error(400, str(exc), None)
        if isinstance(body.prompt, str):
            prompt_ids = await encoder.encode(body.prompt)
        elif not all(0 <= t < engine.tokenizer.vocab_size for t in body.prompt):
            return _error(400, f"prompt: token ids must be in [0, {engine.tokenizer.vocab_size})", "prompt")
        else:
            prompt_ids = list(body.prompt)
        return await _serve(
            app.state.engine, request, prompt_ids, params, body.stream, "text_completion", model_name
        )

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatRequest, request: Request) -> Response:
        try:
            text = engine.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        except Exception as exc:  # a template may reject a conversation (raise_exception)
            return _error(400, f"messages: {exc}", "messages")
        prompt_ids = await encoder.encode(text)
        try:
            params = [body.sampling(body.limit, i, body.logprobs) for i in range(body.n)]
        except ValueError as exc:
            return _error(400, str(exc), None)
        return await _serve(
            app.state.engine, request, prompt_ids, params, body.stream, "chat.completion", model_name
        )

    return app


async def _serve(
    engine: AsyncEngine, request: Request, prompt_ids: list[int], params: list, stream: bool, kind: str,
    model: str,
) -> Response:  # fmt: skip
    handles: list[Handle] = []
    try:
        for p in params:
            handles.append(await engine.submit(prompt_ids, p))
    except ValueError as exc:
        for h in handles:
            engine.abort(h)
        return _error(400, str(exc), "prompt")
    except RuntimeError as exc:  # the engine process is gone
        for h in handles:
            engine.abort(h)
        return _error(503, str(exc), None, kind="server_error")
    rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if stream:
        logprobs = [p.logprobs for p in params]
        events = _stream(engine, handles, rid, created, kind, model, len(prompt_ids), logprobs)
        return StreamingResponse(events, media_type="text/event-stream")
    finals = await _wait(engine, request, handles)
    if finals is None:
        return Response(status_code=499)
    if any(u.finish_reason == "error" for u in finals):
        return _error(500, "the engine failed on this batch (see the server log)", None, kind="server_error")
    choices = [_choice(kind, i, u, params[i].logprobs, engine.tokenizer) for i, u in enumerate(finals)]
    usage = _usage(len(prompt_ids), finals)
    return JSONResponse({"id": rid, "object": kind, "created": created, "model": model, "choices": choices,
                         "usage": usage})  # fmt: skip


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
    prompt_len: int, logprobs: list[bool],
) -> AsyncIterator[str]:  # fmt: skip
    sent = [""] * len(handles)
    finals: dict[int, Update] = {}
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    try:
        if kind == "chat.completion":
            for i in range(len(handles)):
                yield _sse(rid, created, model, chunk_kind, [{"index": i, "delta": {"role": "assistant"}}])
        async with aclosing(_updates(handles)) as updates:
            async for i, u in updates:
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
                if logprobs[i]:  # this chunk's tokens
                    choice["logprobs"] = _logprobs(kind, u.new_token_ids, u.new_logprobs, engine.tokenizer)
                yield _sse(rid, created, model, chunk_kind, [choice])
        usage = _usage(prompt_len, list(finals.values()))
        yield _sse(rid, created, model, chunk_kind, [], usage=usage)
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


def _choice(kind: str, index: int, u: Update, logprobs: bool, tokenizer: Tokenizer) -> dict[str, Any]:
    lp = _logprobs(kind, u.token_ids[: len(u.logprobs)], u.logprobs, tokenizer) if logprobs else None
    if kind == "text_completion":
        return {"index": index, "text": u.text, "logprobs": lp, "finish_reason": u.finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": u.text}, "logprobs": lp,
            "finish_reason": u.finish_reason}  # fmt: skip


def _logprobs(kind: str, ids: list[int], logprobs: list[float], tokenizer: Tokenizer) -> dict[str, Any]:
    """The sampled tokens' log-probabilities in OpenAI's shape for `kind`, each token as its text."""
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    if kind == "text_completion":
        return {"tokens": tokens, "token_logprobs": logprobs}
    return {"content": [{"token": t, "logprob": p, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, p in zip(tokens, logprobs, strict=True)]}  # fmt: skip


def _usage(prompt_len: int, finals: list[Update]) -> dict[str, Any]:
    completion = sum(len(u.token_ids) for u in finals)
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": completion,
        "total_tokens": prompt_len + completion,
        # OpenAI's field for prompt caching: tokens of this prompt found in the prefix cache
        "prompt_tokens_details": {"cached_tokens": max((u.cached_tokens for u in finals), default=0)},
    }


def _sse(rid: str, created: int, model: str, kind: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"


class _Unauthorized(Exception):
    """A /v1 request without the server's API key."""


def _error(status: int, message: str, param: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)
