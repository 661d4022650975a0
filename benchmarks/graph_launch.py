"""What a CUDA graph boundary costs the GPU, apart from any runtime (GPU). Two measurements:

  edges     30 graphs of 27 kernels (a GEMM, 25 small kernels, a GEMM) launched back to back, against
            the same 30 x 27 kernels captured as one graph: (30 launches - one graph) / 30 is the GPU
            time an edge adds, when the 30 launches are one graph relaunched, 30 distinct graphs (as the
            pieces of a model are), and either with an eager kernel after each (a break; then against
            one graph that holds those kernels too)
  weights   a break (distinct graphs, an eager kernel after each, against one graph of it all) when
            each piece's GEMMs read weights of their own, 19 MiB in all (within the 50-60 MB L2) or
            101 MiB (beyond it, as a model's layers are)
  state     a graph replayed, then eager kernels launched on a stream other than the one it was
            captured on, then the same graph replayed again, each scenario in a fresh process: the
            driver runs every graph of the process slower from the first such launch on (a row's
            `per_break_us` compares the broken step, always in that state, with `whole_after_us`: in
            the row whose eager launches went to the capture stream the whole graph was not yet)

Both with the graph benchmark's toy attention kernel as the eager one. Writes JSON with `--out`.

python -m benchmarks.graph_launch --out benchmarks/results/graph_launch_h200.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import write_json

T, HEADS, HEAD_DIM, PIECE, BREAKS = 16, 9, 64, 27, 30
# (stream the graph replays on, stream the eager kernels go to, how many)
SCENARIOS = [
    ("default", "default", 10),
    ("default", "default", 200),
    ("side", "side", 200),
    ("default", "other", 200),
    ("default", "capture", 200),
]


class Bench:
    def __init__(self) -> None:
        from tessera.testing.toy_attention import CausalAttention

        self.x = torch.randn(T * 576, device="cuda", dtype=torch.bfloat16)
        qkv = torch.randn(T, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(T, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.attention = CausalAttention(qkv[:, 0], qkv[:, 1], qkv[:, 2], out)
        self.capture_stream = torch.cuda.Stream()
        self.a = torch.randn(T, 576, device="cuda", dtype=torch.bfloat16)
        self.w = torch.randn(576, 576, device="cuda", dtype=torch.bfloat16) * 0.01
        self.b = torch.empty_like(self.a)

    def small(self) -> None:
        self.x.mul_(1.0)

    def piece(self) -> None:
        for _ in range(PIECE):
            self.small()

    def gemm_piece(self) -> None:
        torch.mm(self.a, self.w, out=self.b)
        for _ in range(PIECE - 2):
            self.small()
        torch.mm(self.a, self.w, out=self.b)

    def eager(self) -> None:
        self.attention(T)

    def work(self) -> None:
        for _ in range(BREAKS):
            self.piece()
            self.eager()

    def capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        g, s = torch.cuda.CUDAGraph(), self.capture_stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm-up
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        return g


def timed_us(fn: Callable[[], Any], reps: int = 50) -> float:
    """GPU µs a call, the host held ahead of the GPU (a spin kernel queued first)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def scenario(replay: str, eager: str, count: int) -> dict[str, Any]:
    b = Bench()
    whole, piece = b.capture(b.work), b.capture(b.piece)
    streams = {"default": torch.cuda.default_stream(), "side": torch.cuda.Stream(),
               "other": torch.cuda.Stream(), "capture": b.capture_stream}  # fmt: skip
    with torch.cuda.stream(streams[replay]):
        before = timed_us(whole.replay)
    with torch.cuda.stream(streams[eager]):
        for _ in range(count):
            b.small()
    torch.cuda.synchronize()
    with torch.cuda.stream(streams[replay]):
        after = timed_us(whole.replay)
        broken = timed_us(lambda: [(piece.replay(), b.eager()) for _ in range(BREAKS)])
    return {
        "replay_stream": replay,
        "eager_stream": eager,
        "eager_launches": count,
        "whole_before_us": round(before, 1),
        "whole_after_us": round(after, 1),
        "broken_us": round(broken, 1),
        "per_break_us": round((broken - after) / BREAKS, 2),
    }


def edges() -> dict[str, float]:
    """GPU µs an edge adds over one graph, per way of launching 30 pieces (see the module's doc)."""
    b = Bench()
    b.eager()  # the slower state from the start, as in any process that also runs eager kernels
    one = b.capture(b.gemm_piece)
    distinct = [b.capture(b.gemm_piece) for _ in range(BREAKS)]
    whole = b.capture(lambda: [b.gemm_piece() for _ in range(BREAKS)])
    timed_us(whole.replay)  # a throwaway round
    base = timed_us(whole.replay)
    # the breaks against one graph that holds the eager kernels too, so their run time cancels out
    whole_eager = b.capture(lambda: [(b.gemm_piece(), b.eager()) for _ in range(BREAKS)])
    base_eager = timed_us(whole_eager.replay)
    runs = {
        "one graph relaunched": (lambda: [one.replay() for _ in range(BREAKS)], base),
        "distinct graphs": (lambda: [g.replay() for g in distinct], base),
        "one graph relaunched, an eager kernel after each": (
            lambda: [(one.replay(), b.eager()) for _ in range(BREAKS)], base_eager),
        "distinct graphs, an eager kernel after each": (
            lambda: [(g.replay(), b.eager()) for g in distinct], base_eager),
    }  # fmt: skip
    out = {"one graph_us": round(base, 1)}
    for name, (fn, ref) in runs.items():
        out[name] = round((timed_us(fn) - ref) / BREAKS, 2)
    return out


def breaks_by_weights() -> dict[str, float]:
    """GPU µs a break adds when the pieces' weights fit in L2 and when they do not."""
    b = Bench()
    b.eager()
    out = {}
    for rows in (576, 3072):
        weights = [torch.randn(rows, 576, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(BREAKS)]
        pieces = [lambda w=w: (F.linear(b.a, w), [b.small() for _ in range(PIECE - 2)], F.linear(b.a, w))
                  for w in weights]  # fmt: skip
        graphs = [b.capture(piece) for piece in pieces]
        whole = b.capture(lambda pieces=pieces: [(piece(), b.eager()) for piece in pieces])
        timed_us(whole.replay)
        base = timed_us(whole.replay)
        broken = timed_us(lambda graphs=graphs: [(g.replay(), b.eager()) for g in graphs])
        mib = BREAKS * rows * 576 * 2 / 2**20
        out[f"{mib:.0f} MiB of weights"] = round((broken - base) / BREAKS, 2)
    return out


def child(argv: list[str]) -> None:
    """One measurement in a fresh CUDA context (the slower state is process-wide and never reverts)."""
    named = {"edges": edges, "weights": breaks_by_weights}
    print(json.dumps(named[argv[0]]() if argv[0] in named else scenario(argv[0], argv[1], int(argv[2]))))


def run_child(*argv: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", *argv]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_launch.py measures CUDA graphs: it needs a GPU")
    if args.child:
        child(args.child)
        return
    edge = run_child("edges")
    print(f"30 pieces as one graph: {edge['one graph_us']:.1f} us; GPU time an edge adds:")
    for name, us in edge.items():
        if name != "one graph_us":
            print(f"  {name:<50} {us:5.2f} us")
    by_weights = run_child("weights")
    for name, us in by_weights.items():
        print(f"a break, the pieces reading {name}: {us:.2f} us")
    rows = []
    for replay, eager, count in SCENARIOS:
        rows.append(run_child(replay, eager, str(count)))
        r = rows[-1]
        line = (f"replay on {replay:<7} {count:4d} eager launches on {eager:<8} whole graph "
                f"{r['whole_before_us']:7.1f} -> {r['whole_after_us']:7.1f} us  "
                f"broken {r['broken_us']:7.1f} us ({r['per_break_us']:.2f} us a break)")  # fmt: skip
        print(line, flush=True)
    report = {"benchmark": "graph-launch", "kernels_per_piece": PIECE, "breaks": BREAKS, "edges_us": edge,
              "break_us_by_weights": by_weights, "state": rows}  # fmt: skip
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
