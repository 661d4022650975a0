"""`python -m benchmarks.tp_step`: forward-step time at TP 1 and TP N on one host's GPUs (issue 23).

Each setting starts the engine (`LLM(..., tensor_parallel_size=N)`: workers for ranks 1..N-1, rank 0
here) on the Llama-3-8B config with random bf16 weights, then times rank 0's `runner.forward` on
DECODE of B sequences (256-token contexts) and a one-sequence EXTEND of N tokens through the engine's
default graphs; every forward rank 0 runs is published to the workers, which run it alongside, so rank
0's CUDA-event time is the step's. Settings: TP 1, and TP N with the all-reduces inside the graph pieces
and as split ops.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CONFIGS, time_interleaved, write_json
from benchmarks.step import make_batch, page_manager
from tessera.engine.llm import LLM


def bench(model: str, tp: int, placement: str, decode: list[int], extend: list[int]) -> dict[str, Any]:
    settings = dict(load_format="dummy", tensor_parallel_size=tp, all_reduce_placement=placement,
                    cuda_graph_max_bs=max(decode))  # fmt: skip
    rows = []
    with LLM(str(CONFIGS / model), **settings) as llm:
        runner = llm.runner  # rank 0's: each forward it runs is published to the workers
        kv = page_manager(runner)
        for kind, size in [("decode", b) for b in decode] + [("extend", n) for n in extend]:
            batch = make_batch(runner, kind, size, size if kind == "decode" else 1, kv=kv)
            step = {"step": lambda _, b=batch, forward=runner.forward: forward(b)}
            ms = time_interleaved(step, batch.input_ids, iters=10, reps=5)["step"]
            rows.append({"kind": kind, "size": size, "ms": round(ms, 4)})
            print(f"  tp {tp} {placement:<6} {kind:<6} {size:>5}: {ms:.3f} ms", flush=True)
            for seq in batch.seqs:
                kv.release(seq, keep_prefix=False)
        stats = runner.graph_stats()
    return {"tp": tp, "all_reduce_placement": placement, "cases": rows, "graph_stats": stats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tp_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--decode", type=int, nargs="*", default=[1, 32])
    p.add_argument("--extend", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if torch.cuda.device_count() < args.tp:
        raise SystemExit(f"benchmarks.tp_step --tp {args.tp} needs {args.tp} GPUs")
    report: dict[str, Any] = {"benchmark": "tp_step", "model": args.model, "results": []}
    for tp, placement in ((1, "inside"), (args.tp, "inside"), (args.tp, "split")):
        report["results"].append(bench(args.model, tp, placement, args.decode, args.extend))
        if args.out:
            write_json(args.out, report)
    base = report["results"][0]["cases"]
    for r in report["results"][1:]:
        pairs = zip(r["cases"], base, strict=True)
        speedups = {f"{c['kind']} {c['size']}": round(b["ms"] / c["ms"], 3) for c, b in pairs}
        print(f"TP {r['tp']} ({r['all_reduce_placement']}) over TP 1: {speedups}")
    return report


if __name__ == "__main__":
    main()
