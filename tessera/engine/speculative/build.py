"""What speculative decoding adds to the engine at start-up: the draft (a model sharing the target's
vocabulary, the target's own first layers, or an EAGLE head) and the runner its forwards run in. Every
tensor-parallel rank builds them here, in the same order as rank 0, so the collectives that loading and
graph capture run pair up across the ranks."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from tessera.engine.config import EngineConfig
from tessera.engine.model_runner import ModelRunner
from tessera.loader.model_loader import load_model


def load_draft(config: EngineConfig, target: nn.Module, context_length: int) -> nn.Module | None:
    """STANDALONE's draft: the target's first layers, or a model sharing its vocabulary that takes
    `context_length` tokens (what the target serves); EAGLE's head, over the target's embedding and
    lm_head. None without a model-drafting algorithm."""
    spec, device = config.speculative, config.torch_device
    if spec.algorithm == "EAGLE":
        from tessera.loader.eagle import load_eagle_head

        path = spec.speculative_draft_model_path
        assert path is not None
        return load_eagle_head(path, target, config.torch_dtype, device, spec.speculative_token_map)
    if spec.algorithm != "STANDALONE":
        return None
    if spec.speculative_draft_layers is not None:
        return target.first_layers(spec.speculative_draft_layers)  # type: ignore[operator]
    path = spec.speculative_draft_model_path
    draft, _, draft_config = load_model(path, config.torch_dtype, device, config.load_format)
    vocab = target.config.vocab_size
    if draft_config.vocab_size != vocab:
        raise ValueError(
            f"the draft model {path} has a vocabulary of {draft_config.vocab_size} tokens, the target "
            f"{vocab}: a draft must share the target's vocabulary"
        )
    if draft_config.max_position_embeddings < context_length:
        raise ValueError(
            f"the draft model {path} takes {draft_config.max_position_embeddings} tokens of context, "
            f"the target {context_length}: pass --context-length "
            f"{draft_config.max_position_embeddings} (or less) to serve both"
        )
    return draft


def cached_models(config: EngineConfig, target: nn.Module, draft: nn.Module | None) -> list[nn.Module]:
    """The models whose KV each page holds: the target's, and a draft's with its own cache (a separate
    model or an EAGLE head; the target's first layers share its cache)."""
    own_cache = draft is not None and config.speculative.speculative_draft_layers is None
    return [target, draft] if own_cache else [target]  # type: ignore[list-item]


def draft_runner(config: EngineConfig, draft: nn.Module | None, target: ModelRunner) -> ModelRunner | None:
    """The runner of the draft's forwards, with the target's pages (and, for the target's own first
    layers, the target's cache of those layers); its graphs are captured here, an EAGLE head's with the
    verify batches' shapes too (it runs the target's rows after each forward)."""
    if draft is None:
        return None
    layers = config.speculative.speculative_draft_layers
    kv = target.kv
    shared = replace(kv, k=kv.k[:layers], v=kv.v[:layers]) if layers is not None else None
    eagle = config.speculative.algorithm == "EAGLE"
    return ModelRunner(draft, config, num_pages=target.kv.num_pages, kv=shared, verifies=eagle)
