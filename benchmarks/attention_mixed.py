"""GPU time of paged attention on a serving-like mixed batch, one launch over the whole batch vs two
(its short sequences, then its long ones: what `build_batch` sets up from 16 short sequences on).
Batch: one prefill chunk of 1024 tokens over a 512-token prefix, and D decodes with contexts of
256..1152 tokens (random pages of 16). Shapes: SmolLM2-135M (9 heads on 3, dim 64), Llama-3-8B (32 on
8, dim 128); bf16, random values. Times are CUDA-graph replays (GPU time only).

python -m benchmarks.attention_mixed [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import ATTENTION_SHAPES, PAGE, graph_ms, write_json
from tessera.layers.triton_attention import paged_attention


def mixed_batch(decodes: int, heads: int, kv_heads: int, dim: int) -> dict:
    g = torch.Generator().manual_seed(decodes)
    q_lens = [1] * decodes + [1024]
    ctx_lens = [*torch.randint(256, 1153, (decodes,), generator=g).tolist(), 1536]
    pages = [-(-c // PAGE) for c in ctx_lens]
    perm = torch.randperm(sum(pages), generator=g).tolist()
    width, rows, at = max(pages), [], 0
    for n in pages:
        rows.append(perm[at : at + n] + [0] * (width - n))
        at += n

    def dev(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device="cuda")

    q_len = torch.tensor(q_lens)
    return {
        "q": torch.randn(sum(q_lens), heads, dim, device="cuda", dtype=torch.bfloat16),
        "k": torch.randn(sum(pages) * PAGE, kv_heads, dim, device="cuda", dtype=torch.bfloat16),
        "v": torch.randn(sum(pages) * PAGE, kv_heads, dim, device="cuda", dtype=torch.bfloat16),
        "table": dev(rows),
        "q_start": dev((torch.cumsum(q_len, 0) - q_len).tolist()),
        "q_len": dev(q_lens),
        "ctx_len": dev(ctx_lens),
        "max_q_len": q_lens,
    }


def time_case(b: dict, decodes: int, dim: int) -> dict[str, float]:
    out = torch.empty_like(b["q"])

    def launch(rows: slice) -> None:
        paged_attention(b["q"], b["k"], b["v"], out, b["table"][rows], b["q_start"][rows], b["q_len"][rows],
                        b["ctx_len"][rows], max(b["max_q_len"][rows]), PAGE, dim**-0.5)  # fmt: skip

    whole, short, long = slice(None), slice(0, decodes), slice(decodes, None)
    return {
        "one_launch": graph_ms(lambda: launch(whole)),
        "two_launches": graph_ms(lambda: (launch(short), launch(long))),
        "decodes_alone": graph_ms(lambda: launch(short)),
        "chunk_alone": graph_ms(lambda: launch(long)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decodes", type=int, nargs="+", default=[63, 255])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    for name, (heads, kv_heads, dim) in ATTENTION_SHAPES.items():
        for decodes in args.decodes:
            ms = time_case(mixed_batch(decodes, heads, kv_heads, dim), decodes, dim)
            rows.append({"shape": name, "decodes": decodes, "chunk": 1024, "ms": ms})
    gpu = torch.cuda.get_device_name()
    print(f"\npaged attention, mixed batch (1 chunk of 1024 + D decodes), ms of GPU time on {gpu}")
    for r in rows:
        ms = r["ms"]
        print(f"  {r['shape']:<14} D={r['decodes']:<4} one launch {ms['one_launch']:.3f}  two launches "
              f"{ms['two_launches']:.3f} ({ms['one_launch'] / ms['two_launches']:.2f}x)  decodes alone "
              f"{ms['decodes_alone']:.3f}  chunk alone {ms['chunk_alone']:.3f}")  # fmt: skip
    if args.out:
        write_json(args.out, {"benchmark": "attention-mixed", "rows": rows})


if __name__ == "__main__":
    main()
