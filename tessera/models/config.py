"""The model configuration, converted once from an HF `config.json` or from GGUF metadata, so model code
never pokes at raw dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

LLAMA_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_BY_MODEL_TYPE = {model_type: arch for arch, model_type in LLAMA_FAMILY.items()}


@dataclass(frozen=True)
class MoEConfig:
    """The sparse MLP of Mixtral / Qwen3-MoE layers: `num_experts` SwiGLU experts of width
    `intermediate_size`, `top_k` per token."""

    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool = True  # Mixtral always; Qwen3-MoE: norm_topk_prob
    sparse_step: int = 1  # every sparse_step-th layer is sparse (Qwen-MoE's decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP (Qwen-MoE's mlp_only_layers)

    def is_sparse(self, layer_id: int) -> bool:
        return layer_id not in self.dense_layers and (layer_id + 1) % self.sparse_step == 0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")

    @cached_property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` of this configuration (inverse of `from_hf`)."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": next(t for t, a in _BY_MODEL_TYPE.items() if a == self.architecture),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }
        if self.rope_scaling:
            hf["rope_scaling"] = self.rope_scaling
        moe = self.moe
        if moe is not None and self.architecture == "MixtralForCausalLM":
            hf |= {
                "num_local_experts": moe.num_experts,
                "num_experts_per_tok": moe.top_k,
                "intermediate_size": moe.intermediate_size,
            }
        elif moe is not None:
            hf |= {
                "num_experts": moe.num_experts,
                "num_experts_per_tok": moe.top_k,
                "moe_intermediate_size": moe.intermediate_size,
                "norm_topk_prob": moe.renormalize,
                "decoder_sparse_step": moe.sparse_step,
                "mlp_only_layers": list(moe.dense_layers),
            }
        return hf

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        arch = (hf.get("architectures") or [_BY_MODEL_TYPE.get(hf.get("model_type", ""), "")])[0]
        if arch not in LLAMA_FAMILY:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(LLAMA_FAMILY)}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=arch == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            moe=_moe(arch, hf),
        )


def _moe(arch: str, hf: dict[str, Any]) -> MoEConfig | None:
    if arch == "MixtralForCausalLM":
        return MoEConfig(hf["num_local_experts"], hf["num_experts_per_tok"], hf["intermediate_size"])
    if arch == "Qwen3MoeForCausalLM":
        return MoEConfig(
            num_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 renamed it
            top_k=hf["num_experts_per_tok"],
            intermediate_size=hf["moe_intermediate_size"],
            renormalize=hf.get("norm_topk_prob", False),
            sparse_step=hf.get("decoder_sparse_step", 1),
            dense_layers=tuple(hf.get("mlp_only_layers") or ()),
        )
    return None


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" else dict(scaling, rope_type=kind)
