"""The tensors an HF checkpoint of a configuration holds: names and full (unsharded) shapes, as
`load_hf_weights` takes them (unfused q/k/v and gate/up, one tensor per expert). Dummy weights are made
from it, so they load through the same sharded path as a real checkpoint."""

from __future__ import annotations

from tessera.model_config import ModelConfig

Shapes = dict[str, tuple[int, ...]]


def checkpoint_shapes(cfg: ModelConfig) -> Shapes:
    h = cfg.hidden_size
    shapes: Shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.input_layernorm.weight": (h,), f"{layer}.post_attention_layernorm.weight": (h,)}
        shapes |= _mla(cfg, f"{layer}.self_attn") if cfg.mla else _gqa(cfg, f"{layer}.self_attn")
        sparse = cfg.moe is not None and cfg.moe.is_sparse(i)
        shapes |= _moe(cfg, f"{layer}.mlp") if sparse else _mlp(h, cfg.intermediate_size, f"{layer}.mlp")
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _gqa(cfg: ModelConfig, prefix: str) -> Shapes:
    h, sizes = cfg.hidden_size, {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}
    shapes: Shapes = {f"{prefix}.{p}_proj.weight": (n, h) for p, n in sizes.items()}
    if cfg.attention_bias:
        shapes |= {f"{prefix}.{p}_proj.bias": (n,) for p, n in sizes.items()}
    if cfg.qk_norm:
        shapes |= {f"{prefix}.q_norm.weight": (cfg.head_dim,), f"{prefix}.k_norm.weight": (cfg.head_dim,)}
    return shapes | {f"{prefix}.o_proj.weight": (h, cfg.q_size)}


def _mla(cfg: ModelConfig, prefix: str) -> Shapes:
    mla, h, heads = cfg.mla, cfg.hidden_size, cfg.num_heads
    assert mla is not None
    if mla.q_lora_rank is None:
        shapes: Shapes = {f"{prefix}.q_proj.weight": (heads * mla.qk_head_dim, h)}
    else:
        shapes = {
            f"{prefix}.q_a_proj.weight": (mla.q_lora_rank, h),
            f"{prefix}.q_a_layernorm.weight": (mla.q_lora_rank,),
            f"{prefix}.q_b_proj.weight": (heads * mla.qk_head_dim, mla.q_lora_rank),
        }
    return shapes | {
        f"{prefix}.kv_a_proj_with_mqa.weight": (mla.latent_dim, h),
        f"{prefix}.kv_a_layernorm.weight": (mla.kv_lora_rank,),
        f"{prefix}.kv_b_proj.weight": (heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
        f"{prefix}.o_proj.weight": (h, heads * mla.v_head_dim),
    }


def _mlp(hidden: int, inter: int, prefix: str) -> Shapes:
    return {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }


def _moe(cfg: ModelConfig, prefix: str) -> Shapes:
    moe, h = cfg.moe, cfg.hidden_size
    assert moe is not None
    shapes: Shapes = {f"{prefix}.gate.weight": (moe.num_experts, h)}
    if moe.scoring == "sigmoid":
        shapes[f"{prefix}.gate.e_score_correction_bias"] = (moe.num_experts,)
    for e in range(moe.num_experts):
        shapes |= _mlp(h, moe.intermediate_size, f"{prefix}.experts.{e}")
    if moe.shared_experts:
        shapes |= _mlp(h, moe.intermediate_size * moe.shared_experts, f"{prefix}.shared_experts")
    return shapes
