"""What the benchmarks share: timing helpers (CUDA events, interleaved rounds, the kernel-time floor),
the folder of model configs, the attention shapes and a JSON writer."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tessera.bench.provenance import provenance

Step = Callable[[torch.Tensor], Any]

# model configs (config.json only) whose weights are not here: random weights of these shapes
CONFIGS = Path(__file__).resolve().parent / "configs"
# the attention benchmarks' shapes, (heads, KV heads, head dim), and their KV page size
ATTENTION_SHAPES = {"smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128)}
PAGE = 16


def time_once(step: Step, ids: torch.Tensor, iters: int, prime: bool = True) -> float:
    """Mean time of `iters` back-to-back steps, in ms (CUDA events), in steady state: with `prime`, one
    untimed step is queued before the start event, so the host prepares the first timed step while a
    step runs on the GPU, as it does every later one. (Unprimed, the first step's host work runs on an
    idle GPU and 1/iters of it lands on every step's time: how much depends on the host's speed that
    moment, not on the step.) A host-bound step measures the same either way."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    if prime:
        step(ids)
    start.record()
    for _ in range(iters):
        step(ids)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def time_interleaved(steps: dict[str, Step], ids: torch.Tensor, iters: int = 20, reps: int = 15) -> dict:
    """Median per variant over `reps` rounds that run every variant once each, so drift in the host's
    speed (seen: eager varying 15-26 ms between runs) hits all variants alike. Each round starts one
    variant later, so no variant always follows the same one (with a fixed order, the variant after
    host-bound eager ran 3-4% faster than others on the same graphs: an 8B model at 512 tokens, H200)."""
    for step in steps.values():
        for _ in range(3):
            step(ids)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(time_once(steps[name], ids, iters))
    return {name: statistics.median(t) for name, t in samples.items()}


def graph_ms(fn: Callable[[], Any], iters: int = 50, reps: int = 5) -> float:
    """GPU time of `fn` in ms, without its host launch cost: `fn` is captured once in a CUDA graph
    (after warm-up on a side stream) and the best of `reps` rounds of back-to-back replays is taken."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    replay = lambda _: graph.replay()  # noqa: E731
    return min(time_once(replay, torch.empty(0), iters) for _ in range(reps))


def kernel_floor(step: Step, ids: torch.Tensor, iters: int = 10) -> tuple[float, int]:
    """(ms of GPU kernel time per step, kernels per step) from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    step(ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step(ids)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels)
    return total_us / iters / 1e3, round(len(kernels) / iters)


def host_us(fn: Callable[[], Any], iters: int = 200) -> float:
    """Host microseconds per call of `fn`, with ~100 ms of GPU work queued first so the GPU never holds
    the host back. Keep iters x launches per call under ~1000: past the launch queue's depth the host
    waits on the GPU and this times the GPU instead."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / iters * 1e6


def write_json(path: Path, report: dict[str, Any]) -> None:
    """`report` as indented JSON at `path` (its folder made if missing), led by its `provenance()`
    (keys the report sets itself win)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**provenance(), **report}, indent=2) + "\n")
