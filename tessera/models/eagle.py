"""The EAGLE-1/2 draft head for Llama-architecture targets: one decoder layer over `fc(cat(embedding,
feature))`, where the feature is the target's final hidden state (after its final norm).

Row i of a draft forward pairs token t[i+1] with the feature of position i and runs at position i; its
output is both the next draft step's feature and, through the target's lm_head, the logits of token
t[i+2]. The layer has no input norm (the fc output goes straight to attention) and the head no final
norm. Embedding and lm_head are the target's (`bind_target`); the head's attention is layer 0 of its own
one-layer KV cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tessera.layers.linear import Loaded, MethodFor, ReplicatedLinear, method_at
from tessera.layers.rotary import RotaryEmbedding
from tessera.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from tessera.model_config import ModelConfig
from tessera.models.decoder import CausalLM, DecoderLayer
from tessera.models.weights import load_hf_weights


class EagleHead(nn.Module):
    feature_input = True  # forward's third input: features [T, hidden] (the model runner passes them)

    def __init__(self, cfg: ModelConfig, fc_bias: bool, method_for: MethodFor | None = None) -> None:
        """`fc_bias`: EAGLE's `bias` config flag (absent means True; its Llama-3 heads set false).
        Built for this TP rank, as its target; `method_for` as `CausalLM`'s, under the head's own
        checkpoint names ("fc", "layers.0.self_attn.qkv_proj", ...)."""
        super().__init__()
        if cfg.num_layers != 1 or cfg.moe is not None or cfg.mla is not None:
            raise ValueError("an EAGLE head is one dense GQA decoder layer (num_hidden_layers=1)")
        self.config = cfg
        h = cfg.hidden_size  # fc: whole on every rank (its input and output are whole hidden states)
        self.fc = ReplicatedLinear(2 * h, h, bias=fc_bias, method=method_at(method_for, "", "fc"))
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling)
        layer = DecoderLayer(cfg, 0, rotary, "layers.0", method_for)
        layer.input_layernorm = nn.Identity()  # NOTE: EAGLE trains its first layer without one
        self.layers = nn.ModuleList([layer])
        self.local_kv_heads: int = layer.self_attn.num_kv_heads  # this rank's, as CausalLM's
        # the target's, set by bind_target
        self.embed_tokens: VocabParallelEmbedding | None = None
        self.lm_head: ParallelLMHead | None = None
        # a hot vocabulary (`restrict_vocab`): the token ids drafted from, and the head's rows of them
        self.draft_vocab: torch.Tensor | None = None
        self.draft_head: torch.Tensor | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, target_hidden: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, positions: [T]; target_hidden: [T, H], the target's final (normed) hidden states or
        this head's own output of the previous draft step. -> hidden [T, H], for `compute_logits` and
        the next step's `target_hidden`."""
        assert self.embed_tokens is not None, "bind_target first"
        x = self.fc(torch.cat((self.embed_tokens(input_ids), target_hidden), dim=-1))
        out, residual = self.layers[0](positions, x, None)
        return out + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] over the vocabulary, or [T, len(draft_vocab)] over a hot one (column j is
        token `draft_vocab[j]`)."""
        assert self.lm_head is not None, "bind_target first"
        if self.draft_head is not None:
            return F.linear(hidden, self.draft_head).float()
        return self.lm_head(hidden).float()

    def restrict_vocab(self, token_ids: torch.Tensor) -> None:
        """Draft from `token_ids` only (distinct ids of the target's vocabulary, e.g. its most frequent
        32k: FR-Spec's hot vocabulary, SGLang's --speculative-token-map): the head's logits cost
        len(token_ids) rows of the lm_head instead of all of them. A copy of those rows is kept; the
        target verifies whatever is drafted, so only the acceptance rate depends on the choice."""
        assert self.lm_head is not None, "bind_target first"
        ids = token_ids.to(device=next(self.parameters()).device, dtype=torch.long)
        self.draft_vocab = ids
        self.draft_head = self.lm_head.rows(ids)

    def bind_target(self, target: CausalLM) -> None:
        """Use the target's embedding and lm_head (shared, not copied)."""
        mine, theirs = self.config, target.config
        if (mine.hidden_size, mine.vocab_size) != (theirs.hidden_size, theirs.vocab_size):
            raise ValueError(
                f"head (hidden {mine.hidden_size}, vocab {mine.vocab_size}) does not fit the target's "
                f"(hidden {theirs.hidden_size}, vocab {theirs.vocab_size})"
            )
        self.embed_tokens = target.model.embed_tokens
        self.lm_head = target.lm_head

    def load_weights(self, weights: Iterable[tuple[str, Loaded]]) -> None:
        """Load an EAGLE checkpoint's tensors (`fc.*`, `layers.0.*`, and `embed_tokens.weight` if there),
        before `bind_target`. Raises on an unknown or a missing tensor."""
        if self.lm_head is not None:
            raise RuntimeError("load the head's weights before bind_target")
        load_hf_weights(self, self.config, self._without_embedding(weights))

    def _without_embedding(self, weights: Iterable[tuple[str, Loaded]]) -> Iterator[tuple[str, Loaded]]:
        # NOTE: EAGLE-1 checkpoints carry a copy of the target's embedding, frozen in training (1 GB for
        # Llama-3-8B): the target's own serves instead, as in vLLM and SGLang
        shape = (self.config.vocab_size, self.config.hidden_size)
        for name, tensor in weights:
            if name != "embed_tokens.weight":
                yield name, tensor
            elif tuple(tensor.shape) != shape:
                raise ValueError(f"checkpoint embedding {tuple(tensor.shape)} is not the target's {shape}")
