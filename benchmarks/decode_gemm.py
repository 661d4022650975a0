"""`python -m benchmarks.decode_gemm`: how close each format's decode GEMMs come to reading their weights
at the card's copy bandwidth (GPU).

A decode step streams every weight once through skinny GEMMs (M <= 8 rows). For each Llama-3-8B linear
shape and M in 1, 4, 8, each format's op (bf16 `F.linear`, `tessera::fp8_linear` per-channel and block,
`tessera::mxfp4_linear`) is replayed in a CUDA graph (GPU time only) and its weight bytes divided by that
time, as a fraction of the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import graph_ms, write_json
from benchmarks.quant import copy_bandwidth
from tessera.quant import fp8, mxfp4

# Llama-3-8B's linear layers (N, K), and its LM head
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # fmt: skip


def ops(n: int, k: int) -> dict[str, tuple[Callable[[torch.Tensor], Any], int]]:
    """Each format's GEMM over one random [n, k] weight, and the bytes it reads."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q_ch, s_ch = fp8.quantize_weight(w, "per_channel")  # in the platform's fp8 type
    q_bl, s_bl = fp8.quantize_weight(w, "block")
    blocks, scales = mxfp4.quantize(w)
    return {
        "bf16": (lambda x: F.linear(x, w), w.nbytes),
        "fp8": (lambda x: fp8.fp8_linear(x, q_ch, s_ch, "per_channel"), q_ch.nbytes + s_ch.nbytes),
        "fp8_block": (lambda x: fp8.fp8_linear(x, q_bl, s_bl, "block"), q_bl.nbytes + s_bl.nbytes),
        "mxfp4": (lambda x: mxfp4.mxfp4_linear(x, blocks, scales), blocks.nbytes + scales.nbytes),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, nargs="*", default=[1, 4, 8])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.decode_gemm needs a GPU")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in args.shapes:
        n, k = SHAPES[shape]
        for fmt, (op, nbytes) in ops(n, k).items():
            for m in args.rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ms = graph_ms(lambda op=op, x=x: op(x))
                fraction = nbytes / (ms / 1e3) / bandwidth
                rows.append({"shape": shape, "n": n, "k": k, "format": fmt, "m": m, "us": round(ms * 1e3, 2),
                             "weight_bytes": nbytes, "of_copy_bandwidth": round(fraction, 3)})  # fmt: skip
                print(
                    f"  {shape:<8} {fmt:<9} M={m}: {ms * 1e3:8.1f} us  {fraction:.2f} of copy bandwidth",
                    flush=True,
                )
        torch.cuda.empty_cache()
    report = {"benchmark": "decode_gemm", "copy_bandwidth_bytes_per_s": bandwidth, "cases": rows}
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
