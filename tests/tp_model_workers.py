"""What the ranks of tests/test_tp_models.py run (spawned processes import it from here): tiny model
folders, and each family's logits on a fixed batch at whatever TP size the process is at.

A rank builds its model from the folder (seeded dummy weights, or a safetensors checkpoint), runs a
prefill of two sequences and a decode step through a model runner over its own KV cache (sized by the
model's `local_kv_heads`), and returns the logits; the test compares them with one rank's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tessera.distributed import ParallelConfig
from tessera.distributed import state as dist_state
from tessera.engine.config import EngineConfig
from tessera.engine.kv_cache import KVCache
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence
from tessera.loader.model_loader import dummy_model, hf_model
from tessera.models.decoder import CausalLM
from tests.runner_driver import RunnerDriver

BASE = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5)  # fmt: skip
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "attention_bias": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "head_dim": 16, "tie_word_embeddings": True},
    "deepseek-v2": {
        "architectures": ["DeepseekV2ForCausalLM"], "num_hidden_layers": 3, "num_key_value_heads": 4,
        "kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 24,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 1.5,
        "topk_method": "greedy",
    },
    "qwen3-moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
    },
}  # fmt: skip
MOE = ("deepseek-v2", "qwen3-moe")
PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26]]  # one prefill of 12 tokens, then 2 decodes
GRAPHS = {"emulate_graphs_on_cpu": True, "piecewise_cuda_graph_tokens": (8, 16)}


def write_folder(root: Path, family: str) -> Path:
    folder = root / family
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BASE | CONFIGS[family]))
    return folder


@contextmanager
def expert_parallel() -> Iterator[None]:
    """Build with experts spread over the TP ranks (ep == tp). NOTE: `launch` joins ranks with ep=1,
    and only a model's construction reads the EP size, so the config is swapped around it."""
    previous = dist_state._state
    dist_state._state = replace(previous, config=ParallelConfig(tp=previous.config.tp, ep=previous.config.tp))
    try:
        yield
    finally:
        dist_state._state = previous


def build(
    folder: str, *, ep: bool = False, checkpoint: bool = False, quantization: str | None = None
) -> CausalLM:
    load = hf_model if checkpoint else dummy_model
    if not ep:
        return load(Path(folder), torch.float32, "cpu", quantization=quantization)
    with expert_parallel():
        return load(Path(folder), torch.float32, "cpu", quantization=quantization)


def logits(model: CausalLM, **settings: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Logits [4, vocab] of the batch's last tokens (prefill, then decode), and the runner's graph stats."""
    mc, pages = model.config, 16
    where = next(model.parameters())  # the KV cache beside the model, in its dtype
    kv = KVCache.allocate(mc.num_layers, pages, 4, model.local_kv_heads, mc.head_dim, where.dtype,
                          where.device, v_head_dim=mc.v_head_dim)  # fmt: skip
    config = EngineConfig.create(page_size=4, attention_backend="torch", **settings)
    runner = RunnerDriver(ModelRunner(model, config, num_pages=pages, kv=kv))
    seqs = [Sequence(list(p), SamplingParams()) for p in PROMPTS]
    out = [runner.run([(s, len(s.prompt_token_ids)) for s in seqs])]
    for s in seqs:
        s.output_token_ids.append(7)
    out.append(runner.run([(s, 1) for s in seqs]))
    return torch.cat(out), runner.graph_stats()


def family_logits(rank: int, world: int, folders: dict[str, str], checkpoint: str) -> dict[str, Any]:
    """Every family's logits at this TP size; the MoE families also with experts spread (EP); one MoE
    family from a safetensors checkpoint (fused 3-D expert tensors) at both; Llama through emulated
    piecewise graphs."""
    out: dict[str, Any] = {}
    for family, folder in folders.items():
        out[family] = logits(build(folder))[0]
        if family in MOE:
            out[f"{family}/ep"] = logits(build(folder, ep=True))[0]
    out["checkpoint"] = logits(build(checkpoint, checkpoint=True))[0]
    out["checkpoint/ep"] = logits(build(checkpoint, ep=True, checkpoint=True))[0]
    out["llama/graphs"], out["llama/graph_stats"] = logits(build(folders["llama"]), **GRAPHS)
    # MXFP4 experts (weight-only: ranks differ only in float order), spread over the ranks
    out["qwen3-moe/mxfp4/ep"] = logits(build(folders["qwen3-moe"], ep=True, quantization="mxfp4"))[0]
    return out


def four_rank_logits(rank: int, world: int, folders: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every family's logits at TP 4: one attention head a rank (Llama's and Qwen3-MoE's two KV heads
    replicated on two ranks each), MoE experts split four ways, the vocabulary in four slices."""
    models = {family: build(folder) for family, folder in folders.items()}
    attn = models["llama"].model.layers[0].self_attn
    assert models["llama"].local_kv_heads == 1 and attn.qkv_proj.num_kv_head_replicas == 2
    return {family: logits(model)[0] for family, model in models.items()}
