"""`tessera bench serve`: online serving benchmark in the manner of SGLang's `bench_serving`.

Random prompts (token lengths drawn from [--input-len-min, --input-len-max], --output-len tokens each,
EOS ignored) are sent to /v1/completions with streaming, at a Poisson --request-rate or as fast as
--max-concurrency allows, after a warm-up. Reports request throughput, input / output / total tok/s, TTFT,
TPOT and ITL (mean, median, p99). `--launch "FLAGS"` starts `tessera serve FLAGS` itself (repeatable,
one run each), so one command compares e.g. piecewise graphs on and off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tessera.bench.provenance import provenance

WORDS = ("graph", "piece", "replay", "token", "batch", "kernel", "attention", "layer", "cache", "page",
         "decode", "prefill", "stream")  # fmt: skip


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    """Prompts of roughly lo..hi tokens (one word is about one token for these words)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


async def one_request(
    session: aiohttp.ClientSession, url: str, prompt: str, output_len: int
) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    result, last = RequestResult(ok=False), start
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                result.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return result
            async for raw in r.content:  # one SSE line at a time
                line = raw.decode().strip()
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                chunk = json.loads(line[5:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"]:  # one chunk per generated token, text or not
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_load(url: str, prompts: list[str], output_len: int, rate: float, concurrency: int) -> tuple:
    # NOTE: aiohttp, as SGLang's bench_serving: with 256 streams on 2 cores it parsed ~74k SSE chunks/s
    # where httpx managed ~25k, and a client that falls behind measures itself, not the server.
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        gate = asyncio.Semaphore(concurrency)
        rng = random.Random(0)

        async def limited(p: str) -> RequestResult:
            async with gate:
                return await one_request(session, url, p, output_len)

        tasks, start = [], time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    inp, out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]

    def stats(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
        xs = sorted(xs)
        return {"mean_ms": 1e3 * statistics.fmean(xs), "median_ms": 1e3 * statistics.median(xs),
                "p99_ms": 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]}  # fmt: skip

    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "input_tok_s": inp / duration,
        "output_tok_s": out / duration,
        "total_tok_s": (inp + out) / duration,
        "ttft": stats([r.ttft for r in ok]),
        "tpot": stats(tpot),
        "itl": stats(itl),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, exited: Callable[[], str | None], timeout: float) -> None:
    """Poll `url`/health until the server answers; `exited()` says why it is gone (None while it runs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (why := exited()) is not None:
            raise RuntimeError(why)
        try:
            _get(f"{url}/health", timeout=1)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout}s")


@contextmanager
def launched(flags: str, ready_timeout: float = 900.0):
    """Start `tessera serve FLAGS` on a free port; yield its URL; stop it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "tessera", "serve", "--port", str(port), *shlex.split(flags)]
    # NOTE: the server's log goes to a file: a pipe nobody reads fills up and blocks the server
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        url = f"http://127.0.0.1:{port}"

        def exited() -> str | None:
            if proc.poll() is None:
                return None
            log.seek(0)
            return f"server exited ({proc.returncode}): {log.read()[-2000:]}"

        try:
            wait_ready(url, exited, ready_timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench(url: str, args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    prompts = make_prompts(args.num_prompts, args.input_len_min, args.input_len_max, args.seed)
    warm = make_prompts(args.warmup, args.input_len_min, args.input_len_max, args.seed + 1)
    asyncio.run(run_load(url, warm, args.output_len, float("inf"), concurrency))
    before = engine_steps(_get(f"{url}/metrics"))
    results, duration = asyncio.run(run_load(url, prompts, args.output_len, args.request_rate, concurrency))
    metrics = _get(f"{url}/metrics")
    graph_lines = [line for line in metrics.splitlines() if line.startswith("tessera_graph")]
    after = engine_steps(metrics)
    steps = after[0] - before[0]
    step_ms = {k: (v - before[1].get(k, 0.0)) / steps * 1e3 for k, v in after[1].items()} if steps else {}
    return summarize(results, duration) | {
        "graph_metrics": graph_lines,
        "engine_steps": steps,
        "engine_step_ms": step_ms,  # host ms a step by phase, this run only (not the warm-up)
    }


def engine_steps(metrics: str) -> tuple[int, dict[str, float]]:
    """(engine steps, host seconds by step phase) from a tessera server's /metrics text."""
    steps, seconds = 0, {}
    for line in metrics.splitlines():
        if line.startswith("tessera_engine_steps_total "):
            steps = int(float(line.split()[-1]))
        elif line.startswith("tessera_engine_step_seconds_total{"):
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            seconds[phase] = float(line.split()[-1])
    return steps, seconds


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="tessera bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--url", default=None, help="a running server (else --launch)")
    p.add_argument(
        "--launch", action="append", default=[], help='start `tessera serve FLAGS` ("" = defaults)'
    )
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len-min", type=int, default=256)
    p.add_argument("--input-len-max", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument(
        "--max-concurrency", type=int, nargs="+", default=[64], help="one run each, on the same server"
    )
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.url and not args.launch:
        p.error("give --url of a running server or --launch FLAGS")
    runs = []
    for flags in args.launch or [None]:
        with nullcontext(args.url) if flags is None else launched(flags) as url:
            for concurrency in args.max_concurrency:
                report = bench(url, args, concurrency)
                settings = {k: v for k, v in vars(args).items() if k != "out"} | {
                    "max_concurrency": concurrency
                }
                report |= {"server_flags": flags, "settings": settings}
                runs.append(report)
                label = args.url if flags is None else (flags or "default flags")
                print(_summary(report, f"{label}, concurrency {concurrency}"))
                if args.out:  # after every run: a run cut short keeps what it measured
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    report_all = {"benchmark": "serve", **provenance(), "runs": runs}
                    args.out.write_text(json.dumps(report_all, indent=2) + "\n")
    return runs


def _summary(r: dict[str, Any], label: str) -> str:
    return (
        f"\n[{label}] {r['completed']} ok, {r['failed']} failed in {r['duration_s']:.1f}s: "
        f"{r['request_throughput']:.2f} req/s, total {r['total_tok_s']:.0f} tok/s "
        f"(output {r['output_tok_s']:.0f}); TTFT median {r['ttft']['median_ms']:.0f} ms, "
        f"TPOT median {r['tpot']['median_ms']:.1f} ms; {r['engine_steps']} engine steps, host ms a step: "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["engine_step_ms"].items())
    )
