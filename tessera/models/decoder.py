"""Llama / Mistral / Qwen2 (q/k/v bias) / Qwen3 (q/k RMSNorm), and their sparse variants Mixtral /
Qwen3-MoE (a routed-experts MLP in place of the dense one): GQA, RoPE, RMSNorm, SwiGLU.

`forward(input_ids, positions)` takes tensors only; attention finds its cache and the batch layout in
the forward context. Q/K/V and gate/up projections are fused: one GEMM each instead of three and two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from tessera.layers.attention import attention  # noqa: F401  (registers tessera::attention)
from tessera.layers.mla import MLAAttention
from tessera.layers.moe import Experts, RoutingConfig, route
from tessera.layers.norm import RMSNorm
from tessera.layers.norm import fused as fused_kernels
from tessera.layers.rotary import RotaryEmbedding
from tessera.model_config import ModelConfig

# (fused parameter, HF parameter, shard) — shard is q/k/v or the index in gate/up.
_STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class GQAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.config, self.layer_id, self.rotary = cfg, layer_id, rotary
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, cfg = x.shape[0], self.config
        q, k, v = self.qkv_proj(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = torch.empty_like(q)
        torch.ops.tessera.attention(q, k, v, out, self.layer_id)
        return self.o_proj(out.view(t, cfg.q_size))


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused_kernels is not None and gate_up.is_cuda:
            return self.down_proj(torch.ops.tessera.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Router weights (and DeepSeek-V3's score-correction bias), named as HF's `gate`."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool, fp32: bool = False) -> None:
        super().__init__()
        self.fp32 = fp32  # logits in float32 whatever the model's dtype: near-ties route as HF's do
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if correction_bias:  # a parameter, not a buffer, so checkpoints load it like any weight
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float()) if self.fp32 else F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    """Router (`gate`), experts and DeepSeek's shared experts, named as HF's Mixtral / Qwen3-MoE /
    DeepSeek blocks; padded rows are routed nowhere (`tessera.layers.moe`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.routing = RoutingConfig(
            top_k=moe.top_k, scoring=moe.scoring, renormalize=moe.renormalize, num_groups=moe.num_groups,
            topk_groups=moe.topk_groups, group_score=moe.group_score,
            routed_scaling_factor=moe.routed_scaling_factor,
        )  # fmt: skip
        self.gate = Router(
            cfg.hidden_size, moe.num_experts, correction_bias=moe.scoring == "sigmoid", fp32=moe.router_fp32
        )
        self.experts = Experts(moe.num_experts, cfg.hidden_size, moe.intermediate_size)
        if moe.shared_experts:
            self.shared_experts = GatedMLP(cfg, moe.intermediate_size * moe.shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.gate, "e_score_correction_bias", None)
        out = self.experts(x, *route(self.gate(x), self.routing, bias))
        return out + self.shared_experts(x) if hasattr(self, "shared_experts") else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = (
            MLAAttention(cfg, layer_id, rotary) if cfg.mla else GQAAttention(cfg, layer_id, rotary)
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        sparse = cfg.moe is not None and cfg.moe.is_sparse(layer_id)
        self.mlp: nn.Module = SparseMoeBlock(cfg) if sparse else GatedMLP(cfg)

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
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.mla else cfg.head_dim
        rotary = RotaryEmbedding(
            rope_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling, interleaved=bool(cfg.mla)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (see `load_hf_weights`)."""
        load_hf_weights(self, self.config, weights)


@torch.no_grad()
def load_hf_weights(model: nn.Module, cfg: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load HF-named tensors into the parameters of `model` (built of this file's layers), filling the
    fused projections shard by shard. Raises if any parameter is left unloaded or a name is unknown."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, int | None]]] = {}
    for name, tensor in weights:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral checkpoints' older module name
        if "rotary_emb" in name:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in params:  # as it is (MLA's own q_proj, HF's fused expert tensors, ...)
            target, shard = name, None
        else:
            target, shard = _fused_target(name) if ".experts." not in name else _expert_target(name)
        if target not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
        _copy_shard(cfg, params[target], tensor, shard)
        if isinstance(shard, tuple):
            expert_parts.setdefault(target, set()).add(shard)
        else:
            loaded.add(target if shard is None else f"{target}#{shard}")
    for target, parts in expert_parts.items():  # per-expert tensors: complete once every part came
        count, halves = params[target].shape[0], (0, 1) if target.endswith("gate_up_proj") else (None,)
        if parts >= {(e, h) for e in range(count) for h in halves}:
            loaded.add(target)
    missing = [n for n in _expected(cfg, params) if n not in loaded]
    if missing:
        raise KeyError(f"checkpoint misses {len(missing)} tensors, e.g. {missing[:3]}")


def _copy_shard(
    cfg: ModelConfig,
    param: torch.Tensor,
    tensor: torch.Tensor,
    shard: str | int | tuple[int, int | None] | None,
) -> None:
    if isinstance(shard, tuple):  # (expert, part): part 0/1 = gate/up rows of gate_up_proj, None = all
        expert, part = shard
        dst = param[expert] if part is None else param[expert].narrow(0, part * param.shape[1] // 2,
                                                                      param.shape[1] // 2)  # fmt: skip
    elif shard is None:
        dst = param
    elif isinstance(shard, int):  # gate / up half of a fused gate_up (dense, shared experts alike)
        half = param.shape[0] // 2
        dst = param.narrow(0, shard * half, half)
    else:
        offset = {"q": 0, "k": cfg.q_size, "v": cfg.q_size + cfg.kv_size}[shard]
        size = cfg.q_size if shard == "q" else cfg.kv_size
        dst = param.narrow(0, offset, size)
    if dst.shape != tensor.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(dst.shape)} vs checkpoint {tuple(tensor.shape)}")
    dst.copy_(tensor)


def _expected(cfg: ModelConfig, params: dict[str, torch.Tensor]) -> list[str]:
    names = []
    for name in params:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".experts." in name:  # the fused tensor, or every expert's parts (see `load_hf_weights`)
            names.append(name)
        elif "qkv_proj" in name:
            names += [f"{name}#{s}" for s in "qkv"]
        elif "gate_up_proj" in name:
            names += [f"{name}#0", f"{name}#1"]
        else:
            names.append(name)
    return names


_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}


def _expert_target(name: str) -> tuple[str, tuple[int, int | None] | None]:
    """An expert tensor's parameter: HF's fused 3-D `experts.gate_up_proj` / `experts.down_proj` as they
    are, or a checkpoint's per-expert `experts.E.{w1,w3,w2}` / `{gate,up,down}_proj` as (expert, part)."""
    match = _EXPERT.match(name)
    if match is None:
        return name, None
    prefix, expert, kind = match.groups()
    part = _EXPERT_PART[kind]
    return f"{prefix}.{'down_proj' if part is None else 'gate_up_proj'}", (int(expert), part)


def _fused_target(name: str) -> tuple[str, str | int | None]:
    for fused, part, shard in _STACKED:
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None
