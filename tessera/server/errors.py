"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for everything the server
refuses (FastAPI's own 404, 405 and body errors included, which answered `{"detail": ...}`), and the
request-body size limit."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ApiError(Exception):
    """A request refused with OpenAI's error body (raised anywhere in a handler)."""

    def __init__(
        self, status: int, message: str, param: str | None, kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_response(
    status: int, message: str, param: str | None, kind: str = "invalid_request_error",
    code: str | None = None, headers: dict[str, str] | None = None,
) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def refused(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc holds a character position, not a field
            detail, at = first.get("ctx", {}).get("error", ""), first.get("loc", ("", "?"))[-1]
            return error_response(400, f"the body is not valid JSON: {detail} (at character {at})", None)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_response(400, f"{param or 'body'}: {message}", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):  # FastAPI's "There was an error parsing the body"
            message = f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
        elif exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, None, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:  # the server logs it as well
        message = f"internal error ({type(exc).__name__}); see the server log"
        return error_response(500, message, None, kind="server_error")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 before the app sees any of it, by its
    Content-Length or, for a chunked body, as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:  # bounded: every message brings bytes or ends the body, and the bytes are capped
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        await error_response(413, message, None, code="request_too_large")(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's `receive`: the body already read, then the client's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
