"""`python -m benchmarks.moe_padding`: does padding cost expert work, and which expert backend is faster?
GPU time of one MoE layer (router, routing, experts) on N real rows alone vs the same N rows padded up to
a capture size S (the padded rows masked by the forward context, as inside a replayed graph), for each
expert backend: the Triton grouped GEMMs and torch._grouped_mm. Each variant is captured in a CUDA graph
and replayed, as inside a piece, so host launch time is not counted. Issue #5's targets: padded within
5 % of alone; the default backend is the one that measures faster. Shapes: DeepSeek-V2-Lite's MoE layer
(64 experts, top-6, expert width 1408, 2 shared) and Qwen3-30B-A3B's (128 experts, top-8, width 768),
bf16, random weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CONFIGS, graph_ms, write_json
from tessera.graphs import ForwardContext, forward_context
from tessera.loader.hf import read_config
from tessera.models.decoder import SparseMoeBlock


def moe_layer(name: str) -> SparseMoeBlock:
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = SparseMoeBlock(read_config(CONFIGS / name)).to(torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.eval()


def bench(name: str, pairs: list[tuple[int, int]], backend: str) -> list[dict[str, Any]]:
    block, rows = moe_layer(name), []
    block.experts.backend = backend
    hidden = block.gate.weight.shape[1]
    for n, size in pairs:
        x = torch.randn(size, hidden, device="cuda", dtype=torch.bfloat16)
        real = torch.tensor(n, device="cuda")  # made before capture: a host-to-device copy can't be captured

        def alone(n: int = n, x: torch.Tensor = x, real: torch.Tensor = real) -> Any:
            with forward_context(ForwardContext(n, n, num_real=real)):
                return block(x[:n])

        def padded(n: int = n, size: int = size, x: torch.Tensor = x, real: torch.Tensor = real) -> Any:
            with forward_context(ForwardContext(size, n, num_real=real)):
                return block(x)

        with torch.no_grad():
            ms = {"alone": graph_ms(alone), "padded": graph_ms(padded)}
        rows.append({"model": name, "experts": backend, "real": n, "padded_to": size, "ms": ms,
                     "ratio": ms["padded"] / ms["alone"]})  # fmt: skip
        print(f"{name} ({backend}): {n} real rows {ms['alone']:.3f} ms, padded to {size} "
              f"{ms['padded']:.3f} ms ({rows[-1]['ratio']:.3f}x)")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_padding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", nargs="+", default=["deepseek-v2-lite", "qwen3-30b-a3b"])
    p.add_argument("--experts", nargs="+", default=["triton", "grouped_mm"], choices=["triton", "grouped_mm"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.moe_padding needs a GPU")
    pairs = [(16, 16), (129, 144), (520, 576), (2048, 2048)]
    rows = [r for m in args.models for b in args.experts for r in bench(m, pairs, b)]
    if args.out:
        report = {"benchmark": "moe-padding", "timing": "CUDA graph replays: GPU time only", "rows": rows}
        write_json(args.out, report)
    return rows


if __name__ == "__main__":
    main()
