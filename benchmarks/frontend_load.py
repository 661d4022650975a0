"""How many streamed tokens a second the HTTP side can carry, with the GPU out of the picture: the real
server (FastAPI + uvicorn, `AsyncEngine`, detokenization, SSE) over a stand-in engine process that speaks
the engine worker's protocol and advances every running request by one token each `--step-ms`, and the
`tessera bench serve` client. Prompts and token ids are real SmolLM2 ones (the embedded tokenizer).

If the achieved output tok/s is far below what the stand-in offers (running requests / step time), the
front end, not the engine, limits a serving benchmark at that concurrency.

python -m benchmarks.frontend_load [--concurrency 64 256] [--step-ms 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.common import write_json
from tessera.bench.serve import free_port, make_prompts, run_load, summarize, wait_ready


def fake_engine(inbox: Connection, outbox: Connection, step_s: float) -> None:
    """The engine worker's protocol (see tessera/server/engine_worker.py) without a model."""
    from tessera.loader.gguf_file import GGUFFile
    from tessera.loader.model_loader import default_model_path
    from tessera.loader.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFFile(default_model_path()).field)
    stats = {"num_running": 0, "num_waiting": 0, "pages_usable": 1, "pages_free": 1, "pages_cached": 0,
             "prefix_hit_rate": 0.0, "has_work": False, "graphs": {}, "steps": 0,
             "step_seconds": {}}  # fmt: skip
    outbox.send(("ready", {"tokenizer": tokenizer, "eos_token_ids": (0,), "stats": stats}))
    rng = random.Random(0)
    running: dict[int, int] = {}  # rid -> tokens left
    while True:
        try:
            if _take(inbox, running, outbox) is False:
                return
        except EOFError:  # the server went away
            return
        if not running:
            continue
        time.sleep(step_s)
        outputs = []
        for rid, left in list(running.items()):
            running[rid] = left - 1
            done = left == 1
            outputs.append((rid, rng.randrange(1000, 40000), -0.5, "length" if done else None, 0))
            if done:
                del running[rid]
        outbox.send(("step", outputs, None))


def _take(inbox: Connection, running: dict[int, int], outbox: Connection) -> bool:
    """Admit and abort what has arrived (sleeping on the pipe while idle); False on "stop"."""
    if inbox.poll(None if not running else 0):
        admitted = []
        while inbox.poll(0):
            msg = inbox.recv()
            if msg[0] == "add":
                running[msg[1]] = msg[3].max_tokens
                admitted.append(msg[1])
            elif msg[0] == "abort":
                running.pop(msg[1], None)
            elif msg[0] == "stop":
                return False
        if admitted:
            outbox.send(("admitted", admitted, []))
    return True


def serve(port: int, step_s: float) -> None:
    import uvicorn

    from tessera.server.api import create_app
    from tessera.server.engine_loop import AsyncEngine

    ctx = mp.get_context("spawn")
    in_recv, in_send = ctx.Pipe(duplex=False)
    out_recv, out_send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=fake_engine, args=(in_recv, out_send, step_s), daemon=True)
    proc.start()
    msg = out_recv.recv()
    engine = AsyncEngine(proc, in_send, out_recv, msg[1])
    uvicorn.run(
        create_app(engine, "stand-in"),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_keep_alive=30,
    )


def _line(row: dict[str, Any], step_ms: float) -> str:
    return (
        f"concurrency {row['concurrency']}: output {row['output_tok_s']:.0f} tok/s of "
        f"{row['offered_output_tok_s']:.0f} offered; TTFT median {row['ttft']['median_ms']:.0f} ms, "
        f"TPOT median {row['tpot']['median_ms']:.1f} ms (stand-in step {step_ms} ms), "
        f"{row['tokens_per_chunk']:.2f} tokens a chunk, {row['failed']} failed"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    port = free_port()
    server = mp.get_context("spawn").Process(target=serve, args=(port, args.step_ms / 1e3))
    server.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, lambda: None if server.is_alive() else f"server exited ({server.exitcode})", 60)
    rows: list[dict[str, Any]] = []
    prompts = make_prompts(args.num_prompts, 256, 1024, 0)
    try:
        for c in args.concurrency:
            asyncio.run(run_load(url, prompts[:8], args.output_len, float("inf"), c))  # warm-up
            results, duration = asyncio.run(run_load(url, prompts, args.output_len, float("inf"), c))
            chunks = sum(len(r.itl) + 1 for r in results if r.ok)  # one per chunk with choices
            row = {"concurrency": c, "offered_output_tok_s": c / (args.step_ms / 1e3),
                   "tokens_per_chunk": sum(r.output_tokens for r in results if r.ok) / max(chunks, 1),
                   **summarize(results, duration)}  # fmt: skip
            rows.append(row)
            print(_line(row, args.step_ms))
    finally:
        server.kill()  # its engine child is a daemon: it goes with it
    if args.out:
        write_json(args.out, {"benchmark": "frontend-load", "step_ms": args.step_ms, "rows": rows})


if __name__ == "__main__":
    main()
