"""What a user would otherwise run: HF transformers on the same model, eager, and with its attention
turned into eager breaks of `breakable-cuda-graphs` (graphed per exact N). EXTEND only: HF's decode
cache grows by concatenation, which no graph can replay.

NOTE: written in a session without GPU time left; first GPU run pending (see the closing note).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import Step
from tessera.models.decoder import CausalLM

_REGISTERED = False


def hf_model(ours: CausalLM) -> Any:
    """HF's LlamaForCausalLM with our model's weights (fused projections split back)."""
    import transformers

    cfg = ours.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).to(ours.lm_head.weight)
    state = {}
    for name, p in ours.state_dict().items():
        if "qkv_proj" in name:
            q, k, v = p.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            base = name.replace("qkv_proj", "{}_proj")
            state |= {base.format("q"): q, base.format("k"): k, base.format("v"): v}
        elif "gate_up_proj" in name:
            gate, up = p.chunk(2)
            base = name.replace("gate_up_proj", "{}_proj")
            state |= {base.format("gate"): gate, base.format("up"): up}
        else:
            state[name] = p
    hf.load_state_dict(state, strict=False)
    return hf.eval()


def hf_eager_step(hf: Any) -> Step:
    return lambda ids: hf(ids[None], use_cache=False).logits


def hf_breakable_step(hf: Any, n: int) -> Step:
    """HF with attention as an eager break, captured at exactly `n` tokens."""
    from breakable_cuda_graphs import BreakableCUDAGraph, breakable_graph

    _register_breakable_attention()
    hf.config._attn_implementation = "tessera_breakable"
    static = torch.zeros(1, n, dtype=torch.long, device="cuda")
    hf(static, use_cache=False)
    graph = BreakableCUDAGraph()
    with breakable_graph(graph):
        out = hf(static, use_cache=False).logits

    def step(ids: torch.Tensor) -> Any:
        static[0].copy_(ids)
        graph.replay()
        return out

    return step


def _register_breakable_attention() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from breakable_cuda_graphs import no_graph
    from transformers import AttentionInterface

    @no_graph
    def eager_sdpa(
        out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        out.copy_(o.transpose(1, 2))

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                  scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        # query [B, H, S, D]; HF expects [B, S, H, D] back. The buffer is allocated inside the graph
        # segment, so its address is stable across replays.
        out = torch.empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3],
                          dtype=query.dtype, device=query.device)  # fmt: skip
        eager_sdpa(out, query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out, None

    AttentionInterface.register("tessera_breakable", attention)
    _REGISTERED = True
