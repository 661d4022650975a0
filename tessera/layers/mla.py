"""DeepSeek's multi-head latent attention (MLA) with its two attention paths as split ops.

The cache holds, per token, one latent: the normalized `kv_lora_rank` compression of K and V and the
rotated `qk_rope_head_dim` key shared by all heads. Two split ops read it, each under its own role in the
forward context's layer table, and every forward calls both:

- `tessera::mla_mha` (role "mla_mha") serves the batch's longer EXTEND sequences: it writes all new latents,
  up-projects each sequence's context to per-head K (nope + shared rope part) and V, and attends as
  ordinary multi-head attention — qk head dim != v head dim. Output [T, H, v_head_dim].
- `tessera::mla_mqa` (role "mla_mqa") serves DECODE and short extends: queries absorbed into the latent space
  (q_nope @ W_UK) attend over the latent cache as one shared head; the output stays latent, [T, H,
  kv_lora_rank], and is up-projected by W_UV inside the next graph piece.

Each op writes zeros on the rows of the other kind, so a mixed batch is the sum of both. Extends take
the MQA path too where it costs fewer FLOPs (the same numbers, from the latent): fewer queries than
`MLAConfig.mqa_cheaper_below` (170 for DeepSeek-V2/V3), since MHA up-projects the whole context first.
`MLALayer.absorb_extend` overrides that: True sends every extend through MQA, False none.

Backends: `torch` (reference, per sequence, any device) and `triton`, where each path is one launch of
the paged-attention kernel over its sequences: MQA over the latent cache itself (the latent is the single
KV head, its first kv_lora_rank columns the values); MHA over the sequences' contexts gathered from the
latent cache and up-projected by kv_b_proj in one GEMM, laid out as pages of one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera.distributed.state import tp_size
from tessera.graphs import get_forward_context, split_op
from tessera.layers.host_copy import to_device
from tessera.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    MethodFor,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    method_at,
)
from tessera.layers.norm import RMSNorm
from tessera.layers.rotary import RotaryEmbedding
from tessera.model_config import MLAConfig, ModelConfig


@dataclass
class MLALayer:
    """What both MLA ops of one layer need: the latent cache, the module (for W_UK / W_UV) and the scale."""

    cache: torch.Tensor  # [slots, 1, kv_lora_rank + qk_rope_head_dim]
    module: Any  # MLAAttention
    page_size: int
    absorb_extend: bool | None = None  # extends through MQA: None where cheaper, True all, False none
    backend: str = "torch"  # "triton": each path one paged-attention launch over its sequences


@dataclass(frozen=True)
class PathLayout:
    """The sequences one MLA path serves, as the paged-attention kernel takes them."""

    page_table: torch.Tensor  # [B, pages]; MHA: rows of the gathered context (pages of one token)
    q_start: torch.Tensor  # [B] int32
    q_len: torch.Tensor
    ctx_len: torch.Tensor
    max_q_len: int
    slots: torch.Tensor | None = None  # MHA: the cache slots of the gathered contexts, in order


def path_layouts(meta: Any, layer: MLALayer) -> tuple[PathLayout | None, PathLayout | None]:
    """(MHA, MQA) layouts of this batch, None for a path with no sequence. Derived once per batch (on
    the host's sequence lengths) and shared by every layer."""
    key = f"mla/{layer.page_size}/{layer.absorb_extend}"
    if key not in meta.derived:
        meta.derived[key] = _path_layouts(meta, layer)
    return meta.derived[key]


def takes_mqa(layer: MLALayer, query_len: int) -> bool:
    """Whether a sequence running `query_len` new tokens takes the absorbed MQA path."""
    if query_len == 1 or layer.absorb_extend:
        return True
    return layer.absorb_extend is None and query_len < layer.module.mla.mqa_cheaper_below


def _path_layouts(meta: Any, layer: MLALayer) -> tuple[PathLayout | None, PathLayout | None]:
    kl, page = meta.kernel, layer.page_size
    # NOTE: decode graphs carry no host sequence list, and hold only decodes
    if layer.absorb_extend or kl.max_q_len == 1:
        return None, PathLayout(kl.page_table, kl.q_start, kl.q_len, kl.ctx_len, kl.max_q_len)
    mqa_rows = [takes_mqa(layer, s.query_len) for s in meta.seqs]
    extend = [i for i, m in enumerate(mqa_rows) if not m]
    decode = [i for i, m in enumerate(mqa_rows) if m]

    def pick(rows: list[int], *tensors: torch.Tensor) -> list[torch.Tensor]:
        if len(rows) == len(meta.seqs):
            return list(tensors)
        index = to_device(np.array(rows, dtype=np.int64), kl.q_len.device)
        return [t.index_select(0, index) for t in tensors]

    mqa = None
    if decode:
        longest = max(meta.seqs[i].query_len for i in decode)
        mqa = PathLayout(*pick(decode, kl.page_table, kl.q_start, kl.q_len, kl.ctx_len), max_q_len=longest)
    if not extend:
        return None, mqa
    table, q_start, q_len, ctx_len = pick(extend, kl.page_table, kl.q_start, kl.q_len, kl.ctx_len)
    lengths = [meta.seqs[i].context_len for i in extend]
    device = ctx_len.device
    # each sequence's context, in position order: row -> cache slot through its page table
    counts = to_device(np.array(lengths, dtype=np.int64), device)
    row_of = torch.repeat_interleave(torch.arange(len(extend), device=device), counts)
    firsts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(int(sum(lengths)), device=device) - firsts[row_of]
    slots = table[row_of, pos // page].long() * page + pos % page
    rows = (firsts[:, None] + torch.arange(max(lengths), device=device)[None, :]).to(torch.int32)
    mha = PathLayout(rows, q_start, q_len, ctx_len, max(meta.seqs[i].query_len for i in extend), slots)
    return mha, mqa


def _context_slots(row: torch.Tensor, context_len: int, page: int) -> torch.Tensor:
    pages = row[: -(-context_len // page)].long()
    return (pages[:, None] * page + torch.arange(page, device=row.device)).flatten()[:context_len]


def _sequences(meta: Any, layer: MLALayer, mqa: bool) -> Any:
    """(row start, SeqLayout, context slots) of the batch's sequences this path serves."""
    start = 0
    for row, seq in zip(meta.kernel.page_table, meta.seqs, strict=True):
        if takes_mqa(layer, seq.query_len) == mqa:
            yield start, seq, _context_slots(row, seq.context_len, layer.page_size)
        start += seq.query_len


def _causal_mask(seq: Any, device: torch.device) -> torch.Tensor:
    rows = torch.arange(seq.query_len, device=device)[:, None] + (seq.context_len - seq.query_len)
    return torch.arange(seq.context_len, device=device)[None, :] <= rows  # [Q, C]


@split_op("tessera::mla_mha", outputs=("out",), mutates=())
def mla_mha(q: torch.Tensor, latent: torch.Tensor, out: torch.Tensor, layer_id: int) -> None:
    """q: [T, H, qk_head_dim]; latent: [T, latent_dim] (new tokens); out: [T, H, v_head_dim]."""
    ctx = get_forward_context()
    layer: MLALayer = ctx.layer(layer_id, "mla_mha")
    n = ctx.raw_num_tokens
    layer.cache.index_copy_(0, ctx.metadata.slot_mapping[:n], latent[:n, None])  # every new token, once
    out.zero_()
    if layer.absorb_extend:  # every sequence takes the MQA path: nothing more to do here
        return
    mla: MLAConfig = layer.module.mla
    if layer.backend == "triton":
        _mha_triton(q, out, layer, mla, ctx.metadata)
        return
    w_kc, w_vc = layer.module.absorbed_weights()
    for start, seq, slots in _sequences(ctx.metadata, layer, mqa=False):
        context = layer.cache[slots, 0]  # [C, latent_dim]
        c, k_rope = context[:, : mla.kv_lora_rank], context[:, mla.kv_lora_rank :]
        k_nope = torch.einsum("cl,hdl->hcd", c, w_kc)  # [H, C, nope]
        k = torch.cat((k_nope, k_rope[None].expand(k_nope.shape[0], -1, -1)), dim=-1)
        v = torch.einsum("cl,hvl->hcv", c, w_vc)  # [H, C, v]
        qh = q[start : start + seq.query_len].transpose(0, 1)  # [H, Q, qk]
        o = F.scaled_dot_product_attention(
            qh, k, v, attn_mask=_causal_mask(seq, q.device), scale=mla.softmax_scale
        )
        out[start : start + seq.query_len] = o.transpose(0, 1)


@split_op("tessera::mla_mqa", outputs=("out",), mutates=())
def mla_mqa(q_latent: torch.Tensor, out: torch.Tensor, layer_id: int) -> None:
    """q_latent: [T, H, latent_dim] (q_nope @ W_UK, then q_rope); out: [T, H, kv_lora_rank]. Runs after
    `mla_mha`, which has written this step's latents."""
    ctx = get_forward_context()
    layer: MLALayer = ctx.layer(layer_id, "mla_mqa")
    out.zero_()
    mla: MLAConfig = layer.module.mla
    if layer.backend == "triton":
        from tessera.layers.triton_attention import paged_attention

        _, p = path_layouts(ctx.metadata, layer)
        if p is not None:  # the latent is the one KV head, its first kv_lora_rank columns the values
            values = layer.cache[:, :, : mla.kv_lora_rank]
            paged_attention(q_latent, layer.cache, values, out, p.page_table, p.q_start, p.q_len, p.ctx_len,
                            p.max_q_len, layer.page_size, mla.softmax_scale)  # fmt: skip
        return
    for start, seq, slots in _sequences(ctx.metadata, layer, mqa=True):
        context = layer.cache[slots, 0]  # [C, latent_dim]: one head shared by all query heads
        qh = q_latent[start : start + seq.query_len].transpose(0, 1)  # [H, Q, latent]
        scores = (qh.float() @ context.float().T) * mla.softmax_scale  # [H, Q, C]
        scores = scores.masked_fill(~_causal_mask(seq, q_latent.device), float("-inf"))
        o = scores.softmax(-1) @ context[:, : mla.kv_lora_rank].float()  # [H, Q, L]
        out[start : start + seq.query_len] = o.transpose(0, 1).to(out.dtype)


def _mha_triton(q: torch.Tensor, out: torch.Tensor, layer: MLALayer, mla: MLAConfig, meta: Any) -> None:
    """The extend sequences' contexts gathered from the latent cache, up-projected to per-head K and V
    in one GEMM, then one paged-attention launch with pages of one token."""
    from tessera.layers.triton_attention import paged_attention

    p, _ = path_layouts(meta, layer)
    if p is None:
        return
    assert p.slots is not None
    context = layer.cache[p.slots, 0]  # [C, kv_lora_rank + rope]
    c, k_rope = context.split([mla.kv_lora_rank, mla.qk_rope_head_dim], -1)
    heads = q.shape[1]
    kv = layer.module.kv_b_proj(c).view(-1, heads, mla.qk_nope_head_dim + mla.v_head_dim)
    k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], -1)
    k = torch.cat((k_nope, k_rope[:, None].expand(-1, heads, -1)), -1)  # [C, H, qk_head_dim]
    paged_attention(q, k, v, out, p.page_table, p.q_start, p.q_len, p.ctx_len, p.max_q_len, 1,
                    mla.softmax_scale)  # fmt: skip


class MLAAttention(nn.Module):
    """DeepSeek-V2/V3 attention, named as HF's: q_proj (or q_a_proj, q_a_layernorm, q_b_proj),
    kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj. Over TP ranks the heads are split (q_proj /
    q_b_proj and kv_b_proj by output, o_proj by input); the compressions q_a and kv_a, and so the latent
    cache, are whole on every rank. `prefix`: the module's HF name, for `method_for`."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        prefix: str = "",
        method_for: MethodFor | None = None,
    ) -> None:
        super().__init__()
        assert cfg.mla is not None
        mla, h = cfg.mla, cfg.hidden_size
        self.mla, self.layer_id, self.rotary = mla, layer_id, rotary
        if cfg.num_heads % tp_size():
            raise ValueError(f"num_heads={cfg.num_heads} is not divisible by the TP size {tp_size()}")
        self.heads = cfg.num_heads // tp_size()  # this rank's

        def method(name: str) -> LinearMethod | None:
            return method_at(method_for, prefix, name)

        q_out = cfg.num_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(h, q_out, bias=False, method=method("q_proj"))
        else:
            self.q_a_proj = ReplicatedLinear(h, mla.q_lora_rank, bias=False, method=method("q_a_proj"))
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6)
            self.q_b_proj = ColumnParallelLinear(
                mla.q_lora_rank, q_out, bias=False, method=method("q_b_proj")
            )
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            h, mla.latent_dim, bias=False, method=method("kv_a_proj_with_mqa")
        )
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6)
        # NOTE: MLA reads kv_b_proj's weight as W_UK / W_UV (`absorbed_weights`): a quantized one is
        # dequantized once after loading (`process_weights_after_loading`), as vLLM and SGLang do
        self.dtype = torch.get_default_dtype()
        self.kv_b_proj = ColumnParallelLinear(
            mla.kv_lora_rank, cfg.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False,
            method=method("kv_b_proj"),
        )  # fmt: skip
        o_in = cfg.num_heads * mla.v_head_dim
        self.o_proj = RowParallelLinear(o_in, h, bias=False, method=method("o_proj"))

    def process_weights_after_loading(self) -> None:
        """After kv_b_proj's own: a quantized kv_b_proj's weight, dequantized for `absorbed_weights`."""
        if not isinstance(self.kv_b_proj.method, UnquantizedLinearMethod):
            weight = self.kv_b_proj.method.dequantize(self.kv_b_proj).to(self.dtype)
            self.register_buffer("kv_b_weight", weight, persistent=False)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, L], W_UV [H, v, L]): views of kv_b_proj, the latent's up-projections."""
        mla = self.mla
        plain = isinstance(self.kv_b_proj.method, UnquantizedLinearMethod)
        w = self.kv_b_proj.weight if plain else self.kv_b_weight
        w = w.view(self.heads, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
        return w[:, : mla.qk_nope_head_dim], w[:, mla.qk_nope_head_dim :]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, mla = x.shape[0], self.mla
        q = self.q_proj(x) if mla.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(t, self.heads, mla.qk_head_dim).split(
            [mla.qk_nope_head_dim, mla.qk_rope_head_dim], -1
        )
        c, k_rope = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], -1)
        q_rope, k_rope = self.rotary(positions, q_rope, k_rope[:, None])
        latent = torch.cat((self.kv_a_layernorm(c), k_rope[:, 0]), dim=-1)  # what the cache keeps
        out = torch.empty(t, self.heads, mla.v_head_dim, dtype=x.dtype, device=x.device)
        torch.ops.tessera.mla_mha(torch.cat((q_nope, q_rope), -1), latent, out, self.layer_id)
        w_kc, w_vc = self.absorbed_weights()
        q_latent = torch.cat((torch.einsum("thd,hdl->thl", q_nope, w_kc), q_rope), -1)
        out_latent = torch.empty(t, self.heads, mla.kv_lora_rank, dtype=x.dtype, device=x.device)
        torch.ops.tessera.mla_mqa(q_latent, out_latent, self.layer_id)
        out = out + torch.einsum("thl,hvl->thv", out_latent, w_vc)
        return self.o_proj(out.reshape(t, -1))
