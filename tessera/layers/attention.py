"""Attention over the paged KV cache, as a split op: it runs eagerly between graph pieces, on the real
tokens only, and finds its layer and the batch layout through the forward context."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tessera.graphs import get_forward_context, split_op
from tessera.layers.attention_metadata import AttentionMetadata, SeqLayout

try:
    from tessera.layers.triton_attention import PagedAttention
except ImportError:  # no Triton: the torch backend only
    PagedAttention = None  # type: ignore[assignment,misc]


@dataclass
class AttentionLayer:
    """What the attention op of one layer needs: its cache, softmax scale and backend."""

    k_cache: torch.Tensor  # [num_slots, kv_heads, head_dim]
    v_cache: torch.Tensor
    scale: float
    page_size: int = 16
    backend: str = "torch"  # "torch" (reference, any device) or "triton" (one launch per batch)


@split_op("tessera::attention", outputs=("out",), mutates=(), zeroes_padding=True)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer_id: int) -> None:
    """q, out: [T, H, D]; k, v: [T, KVH, D]. Writes k, v to the cache, then attends per sequence;
    zeros on `out`'s padded rows (past the forward context's raw_num_tokens)."""
    ctx = get_forward_context()
    meta: AttentionMetadata = ctx.metadata
    layer: AttentionLayer = ctx.layer(layer_id, "attn")
    n = ctx.raw_num_tokens
    if layer.backend == "triton":  # one launch: it also writes the new tokens' K/V to the cache
        _launch(_bind_triton(q, k, v, out, layer))
        return
    out[n : ctx.num_tokens].zero_()
    slots = meta.slot_mapping[:n]
    layer.k_cache.index_copy_(0, slots, k[:n])
    layer.v_cache.index_copy_(0, slots, v[:n])
    start, page = 0, layer.page_size
    offsets = torch.arange(page, device=q.device)
    for row, seq in zip(meta.kernel.page_table, meta.seqs, strict=True):
        end = start + seq.query_len
        pages = row[: -(-seq.context_len // page)].long()
        slots = (pages[:, None] * page + offsets).flatten()[: seq.context_len]
        out[start:end] = _attend(q[start:end], layer, seq, slots)
        start = end


@attention.binder
def _bind(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer_id: int
) -> Callable[[], None] | None:
    """A graph replay's attention over the buffers it was captured with: the Triton launch bound to
    them once (see PagedAttention), so a replayed layer costs a tuple and the kernel's launch."""
    layer: AttentionLayer = get_forward_context().layer(layer_id, "attn")
    if layer.backend != "triton":
        return None
    return functools.partial(_launch, _bind_triton(q, k, v, out, layer))


def _bind_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer: AttentionLayer
) -> PagedAttention:
    assert PagedAttention is not None, "the triton attention backend needs triton"
    return PagedAttention(q, layer.k_cache, layer.v_cache, out, layer.page_size, layer.scale, (k, v))


def _launch(bound: PagedAttention) -> None:
    """One launch a part of the batch (see KernelLayout.parts); the last also zeroes the padded rows.
    The launch plans are worked out by a batch's first layer and reused by the others."""
    ctx = get_forward_context()
    meta: AttentionMetadata = ctx.metadata
    key = ("paged_attention", bound.shape)
    plans = meta.derived.get(key)
    if plans is None:
        slots = meta.slot_mapping
        plans = meta.derived[key] = [
            bound.plan(kl.page_table, kl.q_start, kl.q_len, kl.ctx_len, kl.max_q_len, slots, flat=kl.flat)
            for kl in meta.kernel.parts or (meta.kernel,)
        ]
    for plan in plans[:-1]:
        bound.launch(plan)
    bound.launch(plans[-1], (ctx.raw_num_tokens, ctx.num_tokens))


def _attend(q: torch.Tensor, layer: AttentionLayer, seq: SeqLayout, slots: torch.Tensor) -> torch.Tensor:
    """Reference attention of one sequence's queries over its cached context (`slots`, in order).
    q: [Q, H, D]."""
    k = layer.k_cache[slots].transpose(0, 1)  # [KVH, C, D]
    v = layer.v_cache[slots].transpose(0, 1)
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
