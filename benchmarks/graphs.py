"""`python -m benchmarks.graphs`: step time of a toy 30-layer transformer under each way of running it.

Variants at each token count N (one sequence, bf16):
  eager            the plain module
  pcg-breakable    tessera.graphs, breakable strategy, default capture sizes
  pcg-compile      tessera.graphs, compile strategy (pieces compiled with `eager` / `inductor`)
  pcg-breakable-exact-n   breakable, captured at exactly the benchmarked N (no padding, like the peer)
  full-graph       the whole forward captured as one CUDA graph at exactly N (attention inside)
  peer-breakable   the PyPI package breakable-cuda-graphs on the same toy, captured at exactly N
  kernel-floor     sum of GPU kernel durations of the eager step (torch.profiler): no launch gaps
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Step, kernel_floor, time_interleaved, write_json
from tessera.graphs import ForwardContext, GraphConfig, PiecewiseGraphRunner, forward_context, ops
from tessera.testing.toy import ToyConfig, ToyModel

SMOLLM2_SHAPED = ToyConfig(
    vocab_size=49152, hidden_size=576, num_heads=9, intermediate_size=1536, num_layers=30
)


def eager_step(model: ToyModel) -> Step:
    def step(ids: torch.Tensor) -> Any:
        n = ids.shape[0]
        with forward_context(ForwardContext(n, n)):
            return model(ids)

    return step


def pcg_runner(
    model: ToyModel,
    strategy: str,
    compiler: str,
    max_tokens: int,
    warmups: int,
    sizes: list[int] | None = None,
) -> tuple[Any, dict]:
    cfg = GraphConfig(
        strategy=strategy,
        compiler=compiler,
        max_tokens=max_tokens,
        warmups_per_size=warmups,
        capture_sizes=sizes,
    )
    runner = PiecewiseGraphRunner(model, cfg)
    torch.cuda.synchronize()
    t = time.perf_counter()
    report = runner.capture([torch.randint(0, model.config.vocab_size, (64,), device="cuda")])
    assert report is not None
    info = report.as_dict() | {"wall_seconds": round(time.perf_counter() - t, 3)}
    return runner, info


def _replay_step(graph: Any, static: torch.Tensor, ctx: ForwardContext, out: Any) -> Step:
    """A step that feeds `static`, then replays `graph` (a graph captured at exactly N)."""

    def step(ids: torch.Tensor) -> Any:
        static.copy_(ids)
        with forward_context(ctx):
            graph.replay()
        return out

    return step


def full_graph_step(model: ToyModel, n: int) -> Step:
    static = torch.randint(0, model.config.vocab_size, (n,), device="cuda")
    ctx = ForwardContext(n, n)
    with forward_context(ctx):
        for _ in range(2):
            model(static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)

    return _replay_step(graph, static, ctx, out)


def peer_step(model: ToyModel, n: int) -> Step:
    """breakable-cuda-graphs applied to the same toy: its `no_graph` wraps the attention call."""
    from breakable_cuda_graphs import BreakableCUDAGraph, breakable_graph, no_graph

    static = torch.randint(0, model.config.vocab_size, (n,), device="cuda")
    ctx = ForwardContext(n, n)
    eager_attention = no_graph(lambda split, args: split.run(*args))
    previous = ops.set_split_interceptor(eager_attention)
    try:
        with forward_context(ctx):
            model(static)
            graph = BreakableCUDAGraph()
            with breakable_graph(graph):
                out = model(static)
    finally:
        ops.set_split_interceptor(previous)

    return _replay_step(graph, static, ctx, out)


def graph_memory(make: Callable[[], Any]) -> int:
    """Bytes the caching allocator reserves for what `make()` captures (kept alive while measured)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    keep = make()
    torch.cuda.synchronize()
    used = torch.cuda.memory_reserved() - before
    del keep
    return used


def memory_at(model: ToyModel, n: int) -> dict[str, int]:
    """Graph memory of capturing one size `n` in each graph variant."""

    def pcg(strategy: str) -> Callable[[], Any]:
        def make() -> Any:
            runner = PiecewiseGraphRunner(
                model, GraphConfig(strategy=strategy, capture_sizes=[n], progress=False)
            )
            runner.capture([torch.randint(0, model.config.vocab_size, (n,), device="cuda")])
            return runner

        return make

    return {
        "pcg-breakable": graph_memory(pcg("breakable")),
        "pcg-compile-eager": graph_memory(pcg("compile")),
        "full-graph": graph_memory(lambda: full_graph_step(model, n)),
        "peer-breakable": graph_memory(lambda: peer_step(model, n)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.graphs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048])
    p.add_argument("--max-tokens", type=int, default=8192, help="largest captured size")
    p.add_argument("--compilers", nargs="+", default=["eager", "inductor"])
    p.add_argument("--no-peer", action="store_true", help="skip breakable-cuda-graphs")
    p.add_argument("--warmups-per-size", type=int, default=0, help="eager forwards before each capture")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.graphs needs a GPU: on CPU graphs are only emulated")

    torch.manual_seed(0)
    model = ToyModel(SMOLLM2_SHAPED).cuda().to(torch.bfloat16).eval()
    ids = {n: torch.randint(0, model.config.vocab_size, (n,), device="cuda") for n in args.tokens}
    startup: dict[str, Any] = {}
    runners: dict[str, Any] = {}
    with torch.no_grad():
        eager = eager_step(model)
        floors = {n: kernel_floor(eager, ids[n]) for n in args.tokens}
        # the last: breakable graphs captured at exactly the benchmarked N, as the peer's and the full
        # graph's are (no padding), next to the default sizes a server would use
        variants = [("breakable", "eager", None)] + [("compile", c, None) for c in args.compilers]
        variants.append(("breakable", "eager", sorted(args.tokens)))
        for strategy, compiler, sizes in variants:
            name = "pcg-breakable" if strategy == "breakable" else f"pcg-compile-{compiler}"
            if args.warmups_per_size:
                name += f"-warm{args.warmups_per_size}"
            if sizes is not None:
                name += "-exact-n"
            try:
                runners[name], startup[name] = pcg_runner(
                    model, strategy, compiler, args.max_tokens, args.warmups_per_size, sizes
                )
            except Exception as exc:  # record and go on: one broken variant must not cost the rest
                startup[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                continue
            startup[name]["kernels_per_step"] = {
                n: kernel_floor(runners[name], ids[n])[1] for n in args.tokens
            }
        memory = memory_at(model, 2048) if not args.no_peer else {}
        results: dict[str, dict[int, float]] = {"kernel-floor": {n: f[0] for n, f in floors.items()}}
        for n in args.tokens:
            steps: dict[str, Step] = {"eager": eager, **runners, "full-graph": full_graph_step(model, n)}
            if not args.no_peer:
                steps["peer-breakable"] = peer_step(model, n)
            for name, ms in time_interleaved(steps, ids[n]).items():
                results.setdefault(name, {})[n] = ms
            for runner in runners.values():
                fallbacks = runner.stats.fallbacks
                assert not fallbacks, f"benchmark steps fell back to eager: {dict(fallbacks)}"

    report = {
        "benchmark": "graphs",
        "model": {"kind": "toy transformer (SmolLM2-135M shapes)", **asdict(model.config)},
        "dtype": "bfloat16",
        "step_ms": {k: {str(n): round(v, 4) for n, v in r.items()} for k, r in results.items()},
        "eager_kernels_per_step": {str(n): f[1] for n, f in floors.items()},
        "warmups_per_size": args.warmups_per_size,
        "startup": startup,
        "graph_memory_bytes_one_size_2048": memory,
    }
    print_table(report, args.tokens)
    if args.out:
        write_json(args.out, report)
    return report


def print_table(report: dict[str, Any], tokens: list[int]) -> None:
    steps = report["step_ms"]
    floor = steps["kernel-floor"]
    print(f"\nstep time in ms on {report['gpu']} (x = ratio to the kernel-time floor)")
    print(f"{'variant':<22}" + "".join(f"{'N=' + str(n):>16}" for n in tokens))
    for name, row in steps.items():
        cells = "".join(f"{row[str(n)]:>9.3f} ({row[str(n)] / floor[str(n)]:4.2f}x)" for n in tokens)
        print(f"{name:<22}{cells}")
    for name, used in report["graph_memory_bytes_one_size_2048"].items():
        print(f"graph memory, one 2048-token capture, {name}: {used / 2**20:.0f} MiB")
    for name, info in report["startup"].items():
        if "error" in info:
            print(f"start-up {name}: FAILED {info['error'][:200]}")
            continue
        print(
            f"start-up {name}: {info['total_seconds']:.2f}s for {info['num_sizes']} sizes, "
            f"graph memory {info['graph_memory_bytes'] / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
