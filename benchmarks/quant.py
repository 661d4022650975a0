"""`python -m benchmarks.quant`: step time and weight memory of quantized models against bf16 (GPU).

Models: the Llama-3-8B config with random weights, in bf16 and quantized at load (FP8 per-channel, FP8
128x128 blocks, MXFP4); the embedded SmolLM2 in its GGUF blocks (Q4_1, its tied embedding Q8_0) and
dequantized to bf16. Each format is loaded on its own (one at a time on the GPU), runs the engine's
default graphs, and is timed on DECODE of B sequences (256-token contexts) and a one-sequence EXTEND of
N tokens. Also: the card's copy bandwidth measured in the same run, and each decode step's time over
the time to read its weights once at that bandwidth (the roofline a decode step streams weights at).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CONFIGS, time_interleaved, write_json
from benchmarks.step import make_batch, page_manager
from tessera.engine.config import EngineConfig
from tessera.engine.model_runner import ModelRunner
from tessera.loader import model_loader
from tessera.models.decoder import CausalLM

# the baseline first: bf16, or SmolLM2 dequantized to bf16
FORMATS = {"llama3-8b": ["bf16", "fp8", "fp8_block", "mxfp4"], "smollm2": ["none", "gguf"]}


def gpu_bandwidth(prog: str) -> float:
    """The copy bandwidth of this run's GPU (printed), or exit: `prog` needs one."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{prog} needs a GPU")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    return bandwidth


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s: each byte read once and written once."""
    n = int(gib * 2**30) // 2
    src, dst = torch.randn(n // 2, device="cuda").half().repeat(2), torch.empty(n, device="cuda").half()
    ms = time_interleaved({"copy": lambda _: dst.copy_(src)}, torch.empty(0), iters=10, reps=5)["copy"]
    return 2 * src.nbytes / (ms / 1e3)


def weight_bytes(model: CausalLM) -> dict[str, int]:
    """Bytes of the model's weights: all; those a decode step streams (all but the embedding table,
    unless the head is tied to it); and the decoder layers' linear/expert weights alone."""
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
               if not n.endswith(("rotary.cos", "rotary.sin"))}  # fmt: skip
    layers = [t for n, t in tensors.items() if ".layers." in n and "norm" not in n and "gate.weight" not in n]
    total = sum(t.nbytes for t in tensors.values())
    embedding = model.model.embed_tokens  # its rows as stored: plain, or a GGUF file's blocks
    own = [*embedding.parameters(recurse=False), *embedding.buffers(recurse=False)]
    table = 0 if model.config.tie_word_embeddings else sum(t.nbytes for t in own)
    return {"total": total, "streamed": total - table, "layers": sum(t.nbytes for t in layers)}


def load(name: str, fmt: str) -> CausalLM:
    device = torch.device("cuda")
    if name == "smollm2":
        return model_loader.load_model(None, torch.bfloat16, device, quantization=fmt)[0]
    quantization = None if fmt == "bf16" else fmt
    return model_loader.dummy_model(CONFIGS / name, torch.bfloat16, device, quantization=quantization)


def bench(name: str, fmt: str, decode: list[int], extend: list[int], bandwidth: float) -> dict[str, Any]:
    model = load(name, fmt)
    sizes = weight_bytes(model)
    config = EngineConfig.create(cuda_graph_max_bs=max(decode, default=1))
    runner = ModelRunner(
        model, config, num_pages=(max(decode, default=1) * 300 + max(extend, default=0)) // 16 + 64
    )
    kv = page_manager(runner)
    for cache in runner.kv.k + runner.kv.v:
        cache.normal_()
    rows = []
    for kind, size in [("decode", b) for b in decode] + [("extend", n) for n in extend]:
        batch = make_batch(runner, kind, size, size if kind == "decode" else 1, kv=kv)
        step = {fmt: lambda _, b=batch, forward=runner.forward: forward(b)}
        ms = time_interleaved(step, batch.input_ids, iters=10, reps=5)[fmt]
        row: dict[str, Any] = {"kind": kind, "size": size, "ms": round(ms, 4)}
        if kind == "decode":  # weights read once a step, at the copy bandwidth
            row["roofline_ms"] = round(sizes["streamed"] / bandwidth * 1e3, 4)
            row["over_roofline"] = round(ms / row["roofline_ms"], 3)
        rows.append(row)
        print(f"  {name} {fmt:<9} {kind:<6} {size:>5}: {ms:.3f} ms", flush=True)
        for seq in batch.seqs:
            kv.release(seq, keep_prefix=False)
    result = {"model": name, "format": fmt, "weight_bytes": sizes, "cases": rows,
              "graph_stats": runner.graph_stats()}  # fmt: skip
    del runner, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each format's step time and weight bytes over its model's baseline (bf16; SmolLM2: dequantized)."""
    out = []
    for r in results:
        base = next(
            (b for b in results if b["model"] == r["model"] and b["format"] in ("bf16", "none")), None
        )
        if base is None or base is r:
            continue
        times = {f"{c['kind']} {c['size']}": round(bc["ms"] / c["ms"], 3)
                 for c, bc in zip(r["cases"], base["cases"], strict=True)}  # fmt: skip
        memory = {k: round(v / base["weight_bytes"][k], 4) for k, v in r["weight_bytes"].items()}
        out.append({"model": r["model"], "format": r["format"], "speedup_vs_baseline": times,
                    "weight_bytes_vs_baseline": memory})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--formats", nargs="*", default=None, help="default: every format of each model")
    p.add_argument("--decode", type=int, nargs="*", default=[1, 8, 64])
    p.add_argument("--extend", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    bandwidth = gpu_bandwidth("benchmarks.quant")
    report: dict[str, Any] = {"benchmark": "quant", "copy_bandwidth_bytes_per_s": bandwidth, "results": []}
    for name in args.models:
        for fmt in FORMATS[name]:
            if args.formats and fmt not in args.formats:
                continue
            report["results"].append(bench(name, fmt, args.decode, args.extend, bandwidth))
            report["ratios"] = ratios(report["results"])
            if args.out:
                write_json(args.out, report)
    for r in report.get("ratios", []):
        print(r)
    return report


if __name__ == "__main__":
    main()
