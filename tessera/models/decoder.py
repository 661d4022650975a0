"""Llama / Mistral / Qwen2 (q/k/v bias) / Qwen3 (q/k RMSNorm), their sparse variants Mixtral /
Qwen3-MoE (a routed-experts MLP in place of the dense one) and DeepSeek-V2/V3 (MLA attention, DeepSeek
MoE): GQA, RoPE, RMSNorm, SwiGLU.

`forward(input_ids, positions)` takes tensors only; attention finds its cache and the batch layout in
the forward context. Q/K/V and gate/up projections are fused: one GEMM each instead of three and two.

Every layer is built for this TP rank (`tessera.distributed`): attention heads split over the ranks (KV
heads replicated where fewer than ranks), MLPs split along their intermediate dim, the vocabulary split
between the embedding's and the head's ranks. With one rank each is the plain layer. `method_for` picks
each linear layer's weight format by its HF module name (see `tessera.layers.linear.MethodFor`), and the
embedding's and the head's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from tessera.layers.attention import attention  # noqa: F401  (registers tessera::attention)
from tessera.layers.linear import Loaded, MethodFor, QKVParallelLinear, RowParallelLinear, method_at
from tessera.layers.mla import MLAAttention
from tessera.layers.norm import RMSNorm
from tessera.layers.rotary import RotaryEmbedding
from tessera.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding, vocab_method_at
from tessera.model_config import ModelConfig
from tessera.models.mlp import GatedMLP
from tessera.models.moe_block import SparseMoeBlock
from tessera.models.weights import load_hf_weights

# (Loaded, MethodFor: for the loader, which may not import tessera.layers itself)
__all__ = [
    "CausalLM",
    "DecoderLayer",
    "GQAAttention",
    "GatedMLP",
    "Loaded",
    "MethodFor",
    "SparseMoeBlock",
    "load_hf_weights",
]


class GQAAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        prefix: str = "",
        method_for: MethodFor | None = None,
    ) -> None:
        super().__init__()
        self.config, self.layer_id, self.rotary, self.head_dim = cfg, layer_id, rotary, cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias=cfg.attention_bias,
            method=method_at(method_for, prefix, "qkv_proj"),
        )  # fmt: skip
        # this rank's heads
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            cfg.q_size, cfg.hidden_size, bias=False, method=method_at(method_for, prefix, "o_proj")
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = torch.empty_like(q)
        torch.ops.tessera.attention(q, k, v, out, self.layer_id)
        return self.o_proj(out.view(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        rotary: RotaryEmbedding,
        prefix: str,
        method_for: MethodFor | None = None,
    ) -> None:
        """`prefix`: the layer's HF module name ("model.layers.3"), for `method_for`."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attn = MLAAttention if cfg.mla else GQAAttention
        self.self_attn = attn(cfg, layer_id, rotary, f"{prefix}.self_attn", method_for)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        sparse = cfg.moe is not None and cfg.moe.is_sparse(layer_id)
        mlp = SparseMoeBlock if sparse else GatedMLP
        self.mlp: nn.Module = mlp(cfg, f"{prefix}.mlp", method_for)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (this layer's MLP output, the residual stream before it). The stream is carried apart so
        each residual add fuses into the RMSNorm that follows it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(positions, h), residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, method_for: MethodFor | None = None) -> None:
        super().__init__()
        embed = vocab_method_at(method_for, "model.embed_tokens")
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, method=embed)
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.mla else cfg.head_dim
        rotary = RotaryEmbedding(
            rope_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling, interleaved=bool(cfg.mla)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rotary, f"model.layers.{i}", method_for) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, method_for: MethodFor | None = None) -> None:
        """Built for this TP rank; `method_for`: each linear layer's weight format by its HF module name
        (None: plain weights everywhere), and the embedding's and the head's (a GGUF file's blocks; a
        tied head takes the embedding's). MoE routers stay plain."""
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, method_for)
        head = vocab_method_at(method_for, "lm_head")
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, method=head)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        # KV heads this rank's attention caches per layer (MLA: the one latent)
        attn = self.model.layers[0].self_attn
        self.local_kv_heads: int = 1 if cfg.mla is not None else attn.num_kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """-> hidden states [T, hidden]; logits come from `compute_logits` on the rows that need them."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def first_layers(self, num_layers: int) -> CausalLM:
        """This model's first `num_layers` layers under its own embedding, final norm and head, sharing
        every weight (nothing copied): the draft of self-speculation. Its layer i is this model's layer
        i, so it reads and writes the same layer's KV cache."""
        if not 1 <= num_layers < self.config.num_layers:
            raise ValueError(f"draft layers must be in [1, {self.config.num_layers - 1}], got {num_layers}")
        with torch.device("meta"):  # a skeleton: each of its modules is replaced by this model's below
            view = CausalLM(replace(self.config, num_layers=num_layers))
        view.model.embed_tokens = self.model.embed_tokens
        view.model.layers = nn.ModuleList(self.model.layers[:num_layers])
        view.model.norm = self.model.norm
        view.lm_head = self.lm_head
        return view.eval()

    def load_weights(self, weights: Iterable[tuple[str, Loaded]]) -> None:
        """Load HF-named tensors, or lazy slices of them (see `load_hf_weights`)."""
        load_hf_weights(self, self.config, weights)
