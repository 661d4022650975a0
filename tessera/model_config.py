"""The model configuration, converted once from an HF `config.json` or from GGUF metadata, so model code
never pokes at raw dicts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
_BY_MODEL_TYPE = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}


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
    first_dense: int = 0  # the first layers are dense (DeepSeek's first_k_dense_replace)
    shared_experts: int = 0  # DeepSeek: an always-on MLP of shared_experts x intermediate_size
    scoring: str = "softmax"  # DeepSeek-V3: "sigmoid", with a learned score-correction bias
    num_groups: int = 1  # DeepSeek group-limited routing (see tessera.layers.moe.RoutingConfig)
    topk_groups: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    router_fp32: bool = False  # DeepSeek computes router logits in float32 (as HF does)

    def is_sparse(self, layer_id: int) -> bool:
        if layer_id < self.first_dense or layer_id in self.dense_layers:
            return False
        return (layer_id + 1) % self.sparse_step == 0


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention: K and V live in the cache as one latent of
    `kv_lora_rank` plus a shared rotary key of `qk_rope_head_dim` per token."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    softmax_scale: float = 1.0  # the full scale: qk_head_dim^-0.5, times yarn's mscale^2 if any

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def mqa_cheaper_below(self) -> float:
        """Query count under which an extend costs fewer FLOPs on the absorbed MQA path. Per head, MHA
        up-projects every context token (kv_lora_rank x (nope + v) MACs) and then spends qk + v per
        (query, key); MQA spends latent_dim + kv_lora_rank per (query, key) and up-projects nothing.
        DeepSeek-V2/V3: 512 x 256 / (1088 - 320) = 170 queries."""
        per_pair = self.latent_dim + self.kv_lora_rank - self.qk_head_dim - self.v_head_dim
        per_context = self.kv_lora_rank * (self.qk_nope_head_dim + self.v_head_dim)
        return per_context / per_pair if per_pair > 0 else float("inf")


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
    mla: MLAConfig | None = None  # DeepSeek: then the KV cache holds one latent "head" of latent_dim

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")

    @cached_property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def v_head_dim(self) -> int:
        """Width of the V cache: MLA keeps everything in the one latent (the K cache), so none."""
        return 0 if self.mla is not None else self.head_dim

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` of this configuration (inverse of `from_hf`; not for MLA models yet)."""
        if self.mla is not None:
            raise NotImplementedError("to_hf does not write DeepSeek (MLA) configurations yet")
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
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if arch.startswith("Deepseek"):
            return _deepseek(arch, hf)
        heads = hf["num_attention_heads"]
        return cls(
            **_common(arch, hf),
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            attention_bias=arch == "Qwen2ForCausalLM" or hf.get("attention_bias", False),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            moe=_moe(arch, hf),
        )


def _common(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every supported architecture reads the same way."""
    eos = hf.get("eos_token_id")
    return {
        "architecture": arch,
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        "rope_scaling": _rope_scaling(hf),
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
    }


def _deepseek(arch: str, hf: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V2 / V3: MLA attention (the cache's "KV head" is the latent) and a DeepSeek MoE."""
    v3 = arch == "DeepseekV3ForCausalLM"
    grouped = v3 or hf.get("topk_method") == "group_limited_greedy"  # group-limited top-k routing
    rope, nope = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    scaling = _rope_scaling(hf)
    scale = (rope + nope) ** -0.5
    if scaling and scaling.get("mscale_all_dim"):
        m = (
            0.1 * scaling["mscale_all_dim"] * math.log(scaling["factor"]) + 1.0
            if scaling["factor"] > 1
            else 1.0
        )
        scale *= m * m
    mla = MLAConfig(hf["kv_lora_rank"], nope, rope, hf["v_head_dim"], hf.get("q_lora_rank"), scale)
    experts = hf.get("n_routed_experts") or hf.get("num_local_experts")
    moe = MoEConfig(
        num_experts=experts,
        top_k=hf["num_experts_per_tok"],
        intermediate_size=hf["moe_intermediate_size"],
        renormalize=hf.get("norm_topk_prob", False),
        first_dense=hf.get("first_k_dense_replace", 0),
        shared_experts=hf.get("n_shared_experts") or 0,
        scoring="sigmoid" if v3 else "softmax",
        num_groups=(hf.get("n_group") or 1) if grouped else 1,
        topk_groups=(hf.get("topk_group") or 1) if grouped else 1,
        group_score="top2_sum" if v3 else "max",
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
        router_fp32=True,
    )
    return ModelConfig(**_common(arch, hf), num_kv_heads=1, head_dim=mla.latent_dim, moe=moe, mla=mla)


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
