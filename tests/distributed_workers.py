"""Functions the ranks of tests/test_distributed.py run (spawned processes import them from here), and a
toy packed weight format that exercises ShardSpec slicing the way quantized formats will.

Each rank builds the same seeded full tensors, loads its slice and returns (sharded output, unsharded
reference) pairs; the test compares them in the parent.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tessera.distributed import all_gather, all_reduce
from tessera.graphs import ForwardContext, forward_context
from tessera.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    ShardSpec,
    set_shard_spec,
)
from tessera.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]
BLOCK = 32


class PackedLinearMethod(LinearMethod):
    """Toy 4-bit format: `qweight` uint8 [out, in/2] (two signed nibbles per byte, the even input low),
    `block_scale` [out/32, in/32] (rounded up) and `tensor_scale`, one per fused part."""

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        blocks = (-(-out_features // BLOCK), -(-in_features // BLOCK))
        params = {
            "qweight": (
                torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                ShardSpec(0, 1, 1, 2),
            ),
            "block_scale": (torch.empty(blocks), ShardSpec(0, 1, BLOCK, BLOCK)),
            "tensor_scale": (torch.empty(len(layer.output_sizes)), ShardSpec(None, None, per_shard=True)),
        }
        for name, (data, spec) in params.items():
            layer.register_parameter(name, set_shard_spec(nn.Parameter(data, requires_grad=False), spec))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = dequantize(layer.qweight, layer.block_scale, layer.tensor_scale, layer.output_sizes)
        return F.linear(x, weight, bias)


def dequantize(
    qweight: torch.Tensor, block: torch.Tensor, scales: torch.Tensor, parts: list[int]
) -> torch.Tensor:
    q = qweight.int()
    w = torch.stack([(q & 0xF) - 8, (q >> 4) - 8], dim=-1).flatten(1).float()  # [out, in]
    rows, cols = w.shape
    w = w * block.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return w * scales.repeat_interleave(torch.tensor(parts))[:, None]


def packed_tensors(out: int, inp: int, num_scales: int, seed: int) -> dict[str, torch.Tensor]:
    """A full checkpoint of the toy format, random and never zero."""
    g = torch.Generator().manual_seed(seed)
    blocks = (-(-out // BLOCK), -(-inp // BLOCK))
    return {
        "qweight": torch.randint(0, 256, (out, inp // 2), generator=g, dtype=torch.uint8),
        "block_scale": torch.rand(blocks, generator=g) + 0.5,
        "tensor_scale": torch.rand(num_scales, generator=g) + 0.5,
    }


def load_full(layer: LinearBase, tensors: dict[str, torch.Tensor], shard_id: str | int | None = None) -> None:
    for name, tensor in tensors.items():
        layer.weight_loader(getattr(layer, name), tensor, shard_id)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32)


def _linear_pairs(rank: int, world: int) -> Pairs:
    torch.manual_seed(0)  # the same full tensors on every rank
    x, w, b = _randn(5, 16), _randn(24, 16), _randn(24)
    pairs: Pairs = {}
    col = ColumnParallelLinear(16, 24, gather_output=True)
    load_full(col, {"weight": w, "bias": b})
    pairs["column_gathered"] = col(x), F.linear(x, w, b)
    local = ColumnParallelLinear(16, 24)
    load_full(local, {"weight": w, "bias": b})
    rows = slice(rank * 24 // world, (rank + 1) * 24 // world)
    pairs["column_local"] = local(x), F.linear(x, w, b)[:, rows]
    rep = ReplicatedLinear(16, 24)
    load_full(rep, {"weight": w, "bias": b})
    pairs["replicated"] = rep(x), F.linear(x, w, b)
    gate, up, wd, bd = _randn(32, 16), _randn(32, 16), _randn(16, 32), _randn(16)
    merged = MergedColumnParallelLinear(16, [32, 32])
    load_full(merged, {"weight": gate}, 0)
    load_full(merged, {"weight": up}, 1)
    cut = slice(rank * 32 // world, (rank + 1) * 32 // world)
    pairs["merged"] = merged(x), torch.cat([x @ gate[cut].T, x @ up[cut].T], dim=-1)
    row = RowParallelLinear(32, 16)
    load_full(row, {"weight": wd, "bias": bd})
    hidden = F.silu(x @ gate.T) * (x @ up.T)  # [T, 32]: each rank feeds its input slice
    pairs["row"] = row(hidden[:, cut].contiguous()), F.linear(hidden, wd, bd)
    gate_up = merged(x)
    pairs["mlp"] = (
        row(F.silu(gate_up[:, : 32 // world]) * gate_up[:, 32 // world :]),
        F.linear(hidden, wd, bd),
    )
    return pairs


def _qkv_pairs(rank: int, world: int, num_heads: int, num_kv_heads: int) -> Pairs:
    torch.manual_seed(1)
    head_dim, hidden = 4, 16
    x = _randn(3, hidden)
    wq, wk, wv = (
        _randn(num_heads * head_dim, hidden),
        _randn(num_kv_heads * head_dim, hidden),
        _randn(num_kv_heads * head_dim, hidden),
    )
    bq, bk, bv = (
        _randn(num_heads * head_dim),
        _randn(num_kv_heads * head_dim),
        _randn(num_kv_heads * head_dim),
    )
    qkv = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=True)
    for shard, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
        load_full(qkv, {"weight": w, "bias": b}, shard)
    q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
    q_heads = F.linear(x, wq, bq).view(3, num_heads, head_dim)
    kv_heads = [F.linear(x, w_, b_).view(3, num_kv_heads, head_dim) for w_, b_ in ((wk, bk), (wv, bv))]
    mine = range(rank * qkv.num_heads, (rank + 1) * qkv.num_heads)
    # the KV heads this rank's query heads attend with (GQA: query head h uses KV head h // group)
    group = num_heads // num_kv_heads
    kv_mine = sorted({h // group for h in mine})
    tag = f"qkv_{num_heads}_{num_kv_heads}"
    pairs = {f"{tag}_q": (q, q_heads[:, list(mine)].flatten(1))}
    pairs[f"{tag}_k"] = k, kv_heads[0][:, kv_mine].flatten(1)
    pairs[f"{tag}_v"] = v, kv_heads[1][:, kv_mine].flatten(1)
    return pairs


def _vocab_pairs(rank: int, world: int, vocab: int = 101) -> Pairs:
    torch.manual_seed(2)
    table, hidden = _randn(vocab, 8), _randn(6, 8)
    ids = torch.tensor([0, vocab // 2 - 1, vocab // 2, vocab // 2 + 1, vocab - 2, vocab - 1])
    embed = VocabParallelEmbedding(vocab, 8)
    embed.weight_loader(embed.weight, table)
    head, tied = ParallelLMHead(vocab, 8), ParallelLMHead(vocab, 8)
    head.weight_loader(head.weight, table * 0.5)
    tied.tie_weights(embed)
    return {
        "embedding": (embed(ids), F.embedding(ids, table)),
        "lm_head": (head(hidden), F.linear(hidden, table * 0.5)),
        "lm_head_tied": (tied(hidden), F.linear(hidden, table)),
    } | _gguf_vocab_pairs(ids)


def _gguf_vocab_pairs(ids: torch.Tensor, vocab: int = 101, dim: int = 64) -> Pairs:
    """The embedding (Q8_0), a head of its own (Q4_1) and one tied to the embedding, each rank holding
    its rows in their GGUF blocks (padding rows zero bytes), against the dequantized tables."""
    import gguf

    from tessera.quant.methods import GGUFVocabMethod, gguf_blocks

    gen = torch.Generator().manual_seed(3)
    raw, values = {}, {}
    for t in ("Q8_0", "Q4_1"):
        blocks = gguf.quants.quantize(
            torch.randn(vocab, dim, generator=gen).numpy(), gguf.GGMLQuantizationType[t]
        )
        raw[t] = torch.from_numpy(blocks)
        values[t] = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[t]).copy())
    embed = VocabParallelEmbedding(vocab, dim, method=GGUFVocabMethod("Q8_0"))
    head, tied = ParallelLMHead(vocab, dim, method=GGUFVocabMethod("Q4_1")), ParallelLMHead(vocab, dim)
    tied.tie_weights(embed)
    for layer in (embed, head):
        layer.weight_loader(layer.weight, gguf_blocks(raw[layer.method.ggml_type], layer.method.ggml_type))
        layer.process_weights_after_loading()
    hidden = torch.randn(6, dim, generator=gen)
    return {
        "gguf_embedding": (embed(ids), F.embedding(ids, values["Q8_0"])),
        "gguf_lm_head": (head(hidden), F.linear(hidden, values["Q4_1"])),
        "gguf_lm_head_tied": (tied(hidden), F.linear(hidden, values["Q8_0"])),
    }


def _packed_pairs(rank: int, world: int) -> Pairs:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    gate, up = packed_tensors(64, 64, 1, seed=4), packed_tensors(64, 64, 1, seed=5)
    merged = MergedColumnParallelLinear(64, [64, 64], method=PackedLinearMethod())
    load_full(merged, gate, 0)
    load_full(merged, up, 1)
    cut = slice(rank * 64 // world, (rank + 1) * 64 // world)
    full = [dequantize(t["qweight"], t["block_scale"], t["tensor_scale"], [64]) for t in (gate, up)]
    pairs = {"packed_merged": (merged(x), torch.cat([x @ full[0][cut].T, x @ full[1][cut].T], -1))}
    down = packed_tensors(48, 128, 1, seed=6)  # 48 rows: the last block-scale row is a partial block
    row = RowParallelLinear(128, 48, bias=False, method=PackedLinearMethod())
    load_full(row, down)
    h = torch.randn(3, 128, generator=torch.Generator().manual_seed(7))
    w = dequantize(down["qweight"], down["block_scale"], down["tensor_scale"], [48])
    part = slice(rank * 128 // world, (rank + 1) * 128 // world)
    pairs["packed_row"] = row(h[:, part].contiguous()), h @ w.T
    return pairs


def _comm_pairs(rank: int, world: int) -> Pairs:
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(8))
    total = base * sum(range(1, world + 1))  # rank r contributes (r + 1) * base
    mine = base * (rank + 1)
    pairs = {f"all_reduce_{p}": (all_reduce(mine, p), total) for p in ("inside", "split")}
    padded = mine.clone()
    padded[4:] = float("nan")  # a replay's garbage in the padding rows
    expected = torch.cat([total[:4], torch.zeros(2, 4)])
    ctx = ForwardContext(num_tokens=6, raw_num_tokens=4, num_real=torch.tensor(4))
    with forward_context(ctx):
        for p in ("inside", "split"):
            pairs[f"all_reduce_{p}_padded"] = all_reduce(padded, p), expected
    pairs["input_untouched"] = mine, base * (rank + 1)
    ranks = [base * (r + 1) for r in range(world)]
    pairs["all_gather_last"] = all_gather(mine, -1), torch.cat(ranks, dim=-1)
    pairs["all_gather_rows"] = all_gather(mine, 0), torch.cat(ranks, dim=0)
    for p in ("inside", "split"):
        compiled = torch.compile(lambda t, p=p: all_reduce(t * 2, p) + 1, fullgraph=True, backend="eager")
        pairs[f"compiled_{p}"] = compiled(mine), total * 2 + 1
    return pairs


def tp_checks(rank: int, world: int) -> Pairs:
    """Every (sharded, reference) pair of the layers and collectives at this TP size."""
    pairs = _linear_pairs(rank, world) | _vocab_pairs(rank, world) | _comm_pairs(rank, world)
    pairs |= _qkv_pairs(rank, world, num_heads=4, num_kv_heads=world)
    pairs |= _qkv_pairs(rank, world, num_heads=4, num_kv_heads=1)
    return pairs | _packed_pairs(rank, world)


def tp4_checks(rank: int, world: int) -> Pairs:
    """The cases only four ranks reach: two KV heads replicated twice, a short last vocabulary slice."""
    pairs = _qkv_pairs(rank, world, num_heads=8, num_kv_heads=2) | _vocab_pairs(rank, world)
    return pairs | _linear_pairs(rank, world)


def fail_on(rank: int, world: int, bad_rank: int, how: str) -> int:
    """`bad_rank` raises or kills itself; the others wait in a collective that will never complete."""
    if rank == bad_rank:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)
        raise ValueError(f"boom on rank {rank}")
    dist.barrier()
    time.sleep(60)
    return rank
