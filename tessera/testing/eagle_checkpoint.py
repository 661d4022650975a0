"""A seeded random EAGLE-1 head for a target's sizes, in the published heads' layout: `config.json` (a
one-layer Llama config with EAGLE's `bias` flag) and the tensors `fc.weight` [H, 2H] (+ `fc.bias`),
`layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
`layers.0.post_attention_layernorm.weight` (no input norm, no final norm, no lm_head) and, optionally, the
target's `embed_tokens.weight` (EAGLE's own checkpoints carry a frozen copy of it)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

# the target's config.json keys a head copies: the sizes, norm and rotary settings
_COPIED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "bos_token_id", "eos_token_id",
)  # fmt: skip


class _HasHF(Protocol):  # a tessera ModelConfig (not imported: tessera.testing stands below it)
    def to_hf(self) -> dict[str, Any]: ...


def save_random_eagle_head(
    folder: str | Path,
    target_config: Mapping[str, Any] | _HasHF,
    seed: int = 0,
    *,
    fc_bias: bool = False,
    embedding: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a head for the target of `target_config` (its HF config.json dict, or a ModelConfig) into
    `folder`; -> the folder. Weights are N(0, 1/fan_in), norms U(0.5, 1.5), the fc bias U(-0.1, 0.1)."""
    target = dict(target_config) if isinstance(target_config, Mapping) else target_config.to_hf()
    hf = {k: target[k] for k in _COPIED if target.get(k) is not None}
    hf |= {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bias": fc_bias,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    tensors = _random_tensors(hf, seed, fc_bias)
    if embedding is not None:
        tensors["embed_tokens.weight"] = embedding.detach().to("cpu", copy=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def _random_tensors(hf: dict[str, Any], seed: int, fc_bias: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, inter, heads = hf["hidden_size"], hf["intermediate_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or h // heads
    q, kv = heads * head_dim, hf.get("num_key_value_heads", heads) * head_dim

    def linear(out: int, fan_in: int) -> torch.Tensor:
        return torch.randn(out, fan_in, generator=gen) * fan_in**-0.5

    attn, mlp = "layers.0.self_attn", "layers.0.mlp"
    tensors = {
        "fc.weight": linear(h, 2 * h),
        f"{attn}.q_proj.weight": linear(q, h),
        f"{attn}.k_proj.weight": linear(kv, h),
        f"{attn}.v_proj.weight": linear(kv, h),
        f"{attn}.o_proj.weight": linear(h, q),
        f"{mlp}.gate_proj.weight": linear(inter, h),
        f"{mlp}.up_proj.weight": linear(inter, h),
        f"{mlp}.down_proj.weight": linear(h, inter),
        "layers.0.post_attention_layernorm.weight": torch.rand(h, generator=gen) + 0.5,
    }
    if fc_bias:
        tensors["fc.bias"] = (torch.rand(h, generator=gen) - 0.5) * 0.2
    return tensors
