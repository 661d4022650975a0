"""Where the GPU time of an engine step goes beyond its kernels (GPU): back-to-back steps under
torch.profiler, every GPU activity tagged with the API call that launched it (a graph launch, a kernel
launch, a copy), and the idle time between activities split into classes:

  in-graph     between two nodes of one graph launch (the GPU's own cost of the next node)
  graph-in     into the first node of a graph launch (from whatever ran before it)
  graph-out    out of the last node of a graph launch (into an eager activity or another graph)
  eager        between activities launched one by one (copies, eager kernels, attention breaks)
  step-edge    from the last activity of a step to the first of the next

Prints, per case and variant, the step period, its kernel time, and the idle time of each class, then
the largest single gaps; `--by-name` also sums kernel time by kernel name (to find the kernels that
run longer in one variant than in another). Writes JSON with `--out`.

python -m benchmarks.step_timeline --model smollm2-135m --cases extend:16:8 extend:512:8 decode:8:8
python -m benchmarks.step_timeline --model toy --cases 1 16 128   (`benchmarks.graphs`' toy at N
tokens: breakable graphs captured at exactly N, and the whole step as one graph)
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import host_us, write_json
from benchmarks.step import VARIANTS, load_model, make_batch, page_manager
from tessera.engine.model_runner import ModelRunner

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_events(step: Any, steps: int) -> tuple[list[dict], dict[int, str]]:
    """GPU activities of `steps` back-to-back steps, sorted by start, and the launching API call's name
    by correlation id."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())["traceEvents"]
    gpu = sorted((e for e in trace if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    api = {
        e["args"]["correlation"]: e["name"]
        for e in trace
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    return gpu, api


def short(name: str) -> str:
    """A kernel's name without its signature; every cuBLAS / CUTLASS kernel is "GEMM"."""
    for key in ("gemm", "gemv", "xmma", "cutlass", "nvjet"):
        if key in name.lower():
            return "GEMM"
    name = name.replace("(anonymous namespace)::", "")
    return name.split("(")[0].split("<")[0].removeprefix("void ")[:40]


def analyse(gpu: list[dict], api: dict[int, str], steps: int) -> dict[str, Any]:
    """Per step (the first and last left out): period, busy time, idle time and gap counts by class,
    the largest gaps, mean in-graph gap by the kernel it leads into, and busy time by kernel name."""
    if len(gpu) % steps:
        raise RuntimeError(f"{len(gpu)} GPU activities do not split into {steps} equal steps")
    per = len(gpu) // steps
    idle: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    biggest: list[tuple[float, str, str, str]] = []
    by_name: dict[str, float] = defaultdict(float)
    before: dict[str, list[float]] = defaultdict(list)  # in-graph gaps by the node they lead into
    busy = 0.0
    body = gpu[per : len(gpu) - per] if steps > 2 else gpu  # the first and last steps start/end cold
    for i, (prev, cur) in enumerate(itertools.pairwise(body), start=1):
        gap = cur["ts"] - (prev["ts"] + prev["dur"])
        pc, cc = prev["args"].get("correlation"), cur["args"].get("correlation")
        in_graph = pc == cc and "Graph" in api.get(cc, "")
        if i % per == 0:
            cls = "step-edge"
        elif in_graph:
            cls = "in-graph"
        elif "Graph" in api.get(cc, ""):
            cls = "graph-in"
        elif "Graph" in api.get(pc, ""):
            cls = "graph-out"
        else:
            cls = "eager"
        idle[cls] += gap
        if cls == "in-graph":
            before[short(cur["name"])].append(gap)
        count[cls] += 1
        biggest.append((gap, cls, short(prev["name"]), short(cur["name"])))
    for e in body:
        busy += e["dur"]
        by_name[short(e["name"])] += e["dur"]
    n = len(body) / per
    biggest.sort(reverse=True)
    return {
        "activities_per_step": per,
        "period_us": (body[-per]["ts"] - body[0]["ts"]) / (n - 1),  # first to first activity
        "busy_us": busy / n,
        "idle_us": {k: v / n for k, v in idle.items()},
        "gaps_per_step": {k: v / n for k, v in count.items()},
        "largest_gaps": [
            {"us": round(g, 2), "class": c, "after": a, "before": b} for g, c, a, b in biggest[:8]
        ],
        "in_graph_gap_before_us": {k: round(sum(v) / len(v), 3) for k, v in before.items()},
        "by_name_us": {k: v / n for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])},
    }


def host_profile(step: Any, steps: int = 20) -> None:
    """cProfile of `steps` steps, the GPU held busy first: the functions with the most own time."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def engine_steps(args: argparse.Namespace) -> Iterator[tuple[str, str, Callable[[], Any]]]:
    """(case, variant, step) of the engine's runners on `args.model`."""
    model = load_model(args.model)
    runners = {v: ModelRunner(model, VARIANTS[v], num_pages=args.num_pages) for v in args.variants}
    pages = {v: page_manager(r) for v, r in runners.items()}
    for r in runners.values():
        for cache in r.kv.k + r.kv.v:
            cache.normal_()
    for case in args.cases:
        kind, size, seqs = case.split(":")
        for variant, runner in runners.items():
            batch = make_batch(runner, kind, int(size), int(seqs), kv=pages[variant])
            yield case, variant, lambda r=runner, b=batch: r.forward(b)
            for seq in batch.seqs:
                pages[variant].release(seq, keep_prefix=False)


def toy_steps(args: argparse.Namespace) -> Iterator[tuple[str, str, Callable[[], Any]]]:
    """(N, variant, step) of the graph benchmark's toy: breakable graphs captured at exactly N (no
    padding), and the whole step as one CUDA graph (attention inside, no breaks)."""
    from benchmarks import graphs

    torch.manual_seed(0)
    cfg = graphs.SMOLLM2_SHAPED
    toy = graphs.ToyModel(cfg).cuda().to(torch.bfloat16).eval()
    sizes = [int(c) for c in args.cases]
    runner, _ = graphs.pcg_runner(toy, "breakable", "eager", max(sizes), 0, sizes)
    for n in sizes:
        ids = torch.randint(0, cfg.vocab_size, (n,), device="cuda")
        yield str(n), "pcg-breakable", lambda i=ids: runner(i)
        full = graphs.full_graph_step(toy, n)
        yield str(n), "full-graph", lambda s=full, i=ids: s(i)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="an engine model, or `toy` (cases: token counts)")
    p.add_argument("--cases", nargs="+", default=["extend:16:8", "extend:64:8", "extend:512:8", "decode:8:8"])
    p.add_argument("--variants", nargs="+", default=["graphs", "pcg-breakable"], choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--num-pages", type=int, default=1500)
    p.add_argument("--by-name", action="store_true")
    p.add_argument("--host-profile", action="store_true", help="print a cProfile of each variant's steps")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    report: dict[str, Any] = {"benchmark": "step-timeline", "model": args.model, "cases": []}
    steps = toy_steps(args) if args.model == "toy" else engine_steps(args)
    with torch.no_grad():
        for case, variant, step in steps:
            gpu, api = trace_events(step, args.steps)
            row = {"case": case, "variant": variant, **analyse(gpu, api, args.steps)}
            # host time of a step with the GPU held busy (past the launch queue's ~1000 entries the
            # host would wait on the GPU: few steps for eager's ~300 launches each)
            row["host_us"] = host_us(step, iters=max(2, 1000 // row["activities_per_step"]))
            if args.host_profile:
                host_profile(step)
            report["cases"].append(row)
            idle = "  ".join(
                f"{k} {v:.1f}/{row['gaps_per_step'][k]:.0f}" for k, v in sorted(row["idle_us"].items())
            )
            print(f"{case:<14}{variant:<15} period {row['period_us']:7.1f} us  busy {row['busy_us']:7.1f}  "
                  f"host {row['host_us']:7.1f}  idle (us/gaps) {idle}", flush=True)  # fmt: skip
            for g in row["largest_gaps"][:4]:
                print(f"{'':29}{g['us']:6.2f} us {g['class']:<10} {g['after']} -> {g['before']}")
    if args.by_name:
        print("\nkernel time by name (us per step)")
        for row in report["cases"]:
            top = list(row["by_name_us"].items())[:8]
            print(f"{row['case']:<14}{row['variant']:<15}" + "  ".join(f"{k[:28]} {v:.0f}" for k, v in top))
            gaps = row["in_graph_gap_before_us"].items()
            print(f"{'':29}mean in-graph gap before: " + "  ".join(f"{k[:28]} {v:.2f}" for k, v in gaps))
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
