"""Attention over the paged KV cache, as a split op: it runs eagerly between graph pieces, on the real
tokens only, and finds its layer and the batch layout through the forward context."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tessera.graphs import get_forward_context, split_op


@dataclass
class SeqLayout:
    """One sequence of a batch: `query_len` new tokens after `context_len - query_len` cached ones."""

    query_len: int
    context_len: int
    slots: torch.Tensor  # [context_len] cache slots of all its tokens, in order


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    seqs: list[SeqLayout]


@dataclass
class AttentionLayer:
    """What the attention op of one layer needs: its cache and its softmax scale."""

    k_cache: torch.Tensor  # [num_slots, kv_heads, head_dim]
    v_cache: torch.Tensor
    scale: float


@split_op("tessera::attention", outputs=("out",), mutates=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer_id: int) -> None:
    """q, out: [T, H, D]; k, v: [T, KVH, D]. Writes k, v to the cache, then attends per sequence."""
    ctx = get_forward_context()
    meta: AttentionMetadata = ctx.metadata
    layer: AttentionLayer = ctx.layer(layer_id, "attn")
    n = ctx.raw_num_tokens
    slots = meta.slot_mapping[:n]
    layer.k_cache.index_copy_(0, slots, k[:n])
    layer.v_cache.index_copy_(0, slots, v[:n])
    start = 0
    for seq in meta.seqs:
        end = start + seq.query_len
        out[start:end] = _attend(q[start:end], layer, seq)
        start = end


def _attend(q: torch.Tensor, layer: AttentionLayer, seq: SeqLayout) -> torch.Tensor:
    """Reference attention of one sequence's queries over its cached context. q: [Q, H, D]."""
    k = layer.k_cache[seq.slots].transpose(0, 1)  # [KVH, C, D]
    v = layer.v_cache[seq.slots].transpose(0, 1)
    qh = q.transpose(0, 1)  # [H, Q, D]
    if qh.shape[0] != k.shape[0]:
        repeat = qh.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
    offset = seq.context_len - seq.query_len
    if offset == 0:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=layer.scale)
    else:
        rows = torch.arange(seq.query_len, device=q.device).unsqueeze(1) + offset
        mask = torch.arange(seq.context_len, device=q.device).unsqueeze(0) <= rows  # [Q, C]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=layer.scale)
    return o.transpose(0, 1)
