"""GPU time of paged attention on small extend batches, by the block of query rows a program takes:
16 rows (more programs, each with less work) or 64, up to which longest sequence each is chosen
(`triton_attention.SMALL_BLOCK_MAX_Q`). Cases: T new tokens in 1 or 8 sequences, with no cached prefix
or a 256-token one; per case the per-sequence launch (piecewise graphs, eager) and the flat launch a
full graph captures (`PagedAttention.plan(flat=True)`, room for one padding sequence). Shapes:
SmolLM2-135M (9 heads on 3, dim 64), Llama-3-8B (32 on 8, dim 128); bf16, random values. Times are
CUDA-graph replays of one launch (GPU time only), in microseconds.

python -m benchmarks.attention_blocks [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import ATTENTION_SHAPES, PAGE, graph_ms, write_json
from tessera.layers import triton_attention
from tessera.layers.triton_attention import paged_attention


def extend_batch(tokens: int, seqs: int, prefix: int, heads: int, kv_heads: int, dim: int, flat: bool):
    """`tokens` new tokens over `seqs` sequences after `prefix` cached ones each; flat: one more layout
    row with no queries (a full graph's padding sequence)."""
    q_lens = [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]
    ctx = [prefix + q for q in q_lens]
    pages = [-(-c // PAGE) for c in ctx]
    width, rows, at = max(pages), [], 1  # page 0: padding
    for n in pages:
        rows.append(list(range(at, at + n)) + [0] * (width - n))
        at += n
    if flat:
        q_lens, ctx, rows = [*q_lens, 0], [*ctx, 0], [*rows, [0] * width]
    q_len = torch.tensor(q_lens)

    def dev(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device="cuda")

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    slots = torch.arange(tokens, device="cuda") + at * PAGE  # fresh slots past every page in use
    return {
        "q": rand(tokens, heads, dim), "k": rand(tokens, kv_heads, dim), "v": rand(tokens, kv_heads, dim),
        "k_cache": rand((at + -(-tokens // PAGE)) * PAGE, kv_heads, dim),
        "v_cache": rand((at + -(-tokens // PAGE)) * PAGE, kv_heads, dim),
        "table": dev(rows), "q_start": dev((torch.cumsum(q_len, 0) - q_len).tolist()), "q_len": dev(q_lens),
        "ctx_len": dev(ctx), "max_q_len": tokens if flat else max(q_lens), "slots": slots,
    }  # fmt: skip


def time_launch(b: dict, dim: int, small_max_q: int, flat: bool) -> float:
    out = torch.empty_like(b["q"])
    triton_attention.SMALL_BLOCK_MAX_Q = small_max_q

    def launch() -> None:
        paged_attention(b["q"], b["k_cache"], b["v_cache"], out, b["table"], b["q_start"], b["q_len"],
                        b["ctx_len"], b["max_q_len"], PAGE, dim**-0.5, new_kv=(b["k"], b["v"], b["slots"]),
                        flat=flat)  # fmt: skip

    return graph_ms(launch) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--prefix", type=int, nargs="+", default=[0, 256])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    default = triton_attention.SMALL_BLOCK_MAX_Q
    rows = []
    for name, (heads, kv_heads, dim) in ATTENTION_SHAPES.items():
        for tokens in args.tokens:
            for seqs in (1, 8):
                for prefix in args.prefix:
                    us = {}
                    for flat in (False, True):
                        b = extend_batch(tokens, seqs, prefix, heads, kv_heads, dim, flat)
                        for label, small in (("rows16", 1 << 20), ("rows64", 0)):
                            us[f"{'flat' if flat else 'per-seq'} {label}"] = time_launch(b, dim, small, flat)
                    rows.append({"shape": name, "tokens": tokens, "seqs": seqs, "prefix": prefix, "us": us})
                    cells = "  ".join(f"{k} {v:6.2f}" for k, v in us.items())
                    print(f"{name:<13} T={tokens:<4} x{seqs} prefix {prefix:<4} {cells}", flush=True)
    triton_attention.SMALL_BLOCK_MAX_Q = default
    if args.out:
        write_json(args.out, {"benchmark": "attention-blocks", "rows": rows})


if __name__ == "__main__":
    main()
