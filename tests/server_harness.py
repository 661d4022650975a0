"""An app served in a thread on 127.0.0.1, over an engine process on the CPU, as the server tests run it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tessera.engine.config import EngineConfig
from tessera.server.engine_loop import AsyncEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(make_app: Callable[[AsyncEngine], Any]) -> Iterator[tuple[str, AsyncEngine, Any]]:
    """(url, engine, app): the embedded model's engine in its own process and `make_app(engine)` served
    by uvicorn in a thread until the block ends; then both are stopped."""
    import uvicorn

    engine = AsyncEngine.start(EngineConfig(device="cpu"))
    app = make_app(engine)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        assert srv.started, "server did not start"
        yield f"http://127.0.0.1:{port}", engine, app
    finally:
        srv.should_exit = True
        thread.join(timeout=20)
        engine.shutdown()
