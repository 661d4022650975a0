"""Runs one scheduled batch through the model: builds the batch tensors, sets the forward context
(batch metadata and the per-layer attention table), and returns logits of each sequence's last token."""

from __future__ import annotations

import torch
from torch import nn

from tessera.engine.batch import build_batch, commit
from tessera.engine.kv_cache import KVCache, PagePool
from tessera.engine.sequence import Sequence
from tessera.graphs import ForwardContext, forward_context
from tessera.layers.attention import AttentionLayer
from tessera.models.config import ModelConfig


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        cfg: ModelConfig,
        *,
        num_pages: int,
        page_size: int = 16,
    ) -> None:
        self.model, self.cfg = model, cfg
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.page_size = page_size
        self.kv = KVCache.allocate(
            cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device
        )
        self.pool = PagePool(num_pages)
        scale = cfg.head_dim**-0.5
        self.layers = {
            (i, "attn"): AttentionLayer(self.kv.k[i], self.kv.v[i], scale) for i in range(cfg.num_layers)
        }

    @torch.no_grad()
    def run(self, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Forward `work` (sequence, tokens to run) -> logits [num_seqs, vocab] in float32."""
        batch = build_batch(work, self.pool, self.page_size, self.device)
        n = batch.input_ids.shape[0]
        with forward_context(ForwardContext(n, n, batch.metadata, self.layers)):
            hidden = self.model(batch.input_ids, batch.positions)
        commit(work)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.pages)
        seq.pages, seq.num_cached = [], 0
