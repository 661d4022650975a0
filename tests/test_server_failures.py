"""Engine failures (issue 19): a failed step fails its requests with OpenAI errors (a 500, or an error event
the `openai` client raises) and the server serves on; a dead engine process fails its requests, zeroes the
gauges and is reaped, and `tessera serve` then exits non-zero for its supervisor (CPU, SmolLM2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tessera.server.engine_loop import AsyncEngine

from .server_harness import free_port, serving
from .test_server import _assert_all_pages_back

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

# long enough (on a CPU: seconds) that both requests are still running when the failure comes
LONG = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 400, "temperature": 0,
        "extra_body": {"ignore_eos": True}}  # fmt: skip
FAILED = 'tessera_requests_total{outcome="failed"}'


@contextmanager
def _serving() -> Iterator[tuple[str, AsyncEngine]]:
    """An engine process and the app over it, served in a thread on 127.0.0.1."""
    from tessera.server.api import create_app

    with serving(lambda engine: create_app(engine, "smollm2")) as (url, engine, _):
        yield url, engine


@pytest.fixture(scope="module")
def live() -> Iterator[Callable[[], tuple[str, AsyncEngine]]]:
    """A running server, shared while its engine lives (~10 s to start one on a CPU); a new one after."""
    current: tuple[str, AsyncEngine] | None = None
    with ExitStack() as stack:

        def get() -> tuple[str, AsyncEngine]:
            nonlocal current
            if current is None or not current[1].alive:
                current = stack.enter_context(_serving())
            return current

        yield get


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _in_flight(url: str, engine: AsyncEngine, pool: ThreadPoolExecutor) -> tuple[Future[httpx.Response], Any]:
    """A non-streaming request and a stream (its first chunk read), both running in the engine."""
    body = {k: v for k, v in LONG.items() if k != "extra_body"} | {"ignore_eos": True}
    whole = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    stream = client.completions.create(**LONG, stream=True)
    next(iter(stream))
    deadline = time.time() + 20
    while engine.stats["num_running"] < 2:  # reported every 0.2 s while the engine is busy
        assert time.time() < deadline and not whole.done(), engine.stats
        time.sleep(0.05)
    return whole, stream


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def test_a_failed_step_fails_its_requests_with_errors_and_the_server_serves_on(live: Callable) -> None:
    url, engine = live()
    with ThreadPoolExecutor(1) as pool:
        failed = _metric(url, FAILED)
        whole, stream = _in_flight(url, engine, pool)
        engine.fail_next_step("injected kernel failure")
        with pytest.raises(openai.APIError, match="engine failed"):
            _drain(stream)
        r = whole.result(timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert _metric(url, FAILED) == failed + 2
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        ok = client.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0
        )
        assert ok.choices[0].text.startswith(" Paris")
        _assert_all_pages_back(engine)


def test_a_dead_engine_fails_its_requests_zeroes_the_gauges_and_is_reaped(live: Callable) -> None:
    url, engine = live()
    failed = _metric(url, FAILED)
    with ThreadPoolExecutor(1) as pool:
        whole, stream = _in_flight(url, engine, pool)
        assert _metric(url, "tessera_num_requests_running") == 2
        os.kill(engine._proc.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine process exited"):
            _drain(stream)
        r = whole.result(timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        deadline = time.time() + 20
        while not engine.died:  # reaped, then marked
            assert time.time() < deadline
            time.sleep(0.05)
        assert engine._proc.exitcode == -signal.SIGKILL  # reaped: no <defunct> process
        assert _metric(url, "tessera_num_requests_running") == 0
        assert _metric(url, "tessera_num_requests_waiting") == 0
        assert _metric(url, FAILED) == failed + 2
        assert httpx.get(f"{url}/health").status_code == 503
        late = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["type"] == "server_error"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _engine_pid(pid: int) -> int:
    """The engine process of a `tessera serve`: its spawned child (not multiprocessing's resource tracker)."""
    engines = [c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(engines) == 1, engines
    return engines[0]


def test_tessera_serve_exits_non_zero_when_its_engine_dies(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "tessera", "serve", "--device", "cpu", "--port", str(port)]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 90
        while proc.poll() is None:
            assert time.time() < deadline, "tessera serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        os.kill(_engine_pid(proc.pid), signal.SIGKILL)
        assert proc.wait(timeout=30) == 1, log.read_text()
        errors = [line for line in log.read_text().splitlines() if line.startswith("ERROR")]
        assert any("the engine process died (exit code -9)" in line for line in errors), errors
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
