"""Full CUDA graphs for decode batches (one new token per sequence), attention captured inside.

Decode shapes are easy to freeze, so unlike extend batches the whole forward, attention included, is one
graph per batch size. All attention metadata lives in static tensors the graph reads: token ids,
positions, slot mapping, page table, context lengths. Padded rows write their K/V to the dummy slot and
attend only to it. Graphs share the memory pool of the piecewise graphs (the same backend).
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tessera.engine.batch import ForwardBatch
from tessera.engine.kv_cache import DUMMY_SLOT
from tessera.graphs import ForwardContext, forward_context
from tessera.graphs.hygiene import frozen_gc
from tessera.graphs.platform import Graph, GraphBackend
from tessera.layers.attention import AttentionMetadata, KernelLayout

logger = logging.getLogger("tessera")


def decode_batch_sizes(max_bs: int) -> list[int]:
    """nano-vllm's schedule: 1, 2, 4, 8, then every 16 up to `max_bs` (always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    return sorted(set(sizes) | {max_bs})


class DecodeGraphRunner:
    def __init__(
        self,
        model: nn.Module,
        backend: GraphBackend,
        layers: dict[Any, Any],
        *,
        max_bs: int,
        max_pages_per_seq: int,
        page_size: int,
    ) -> None:
        self.model, self.backend, self.layers = model, backend, layers
        self.sizes = decode_batch_sizes(max_bs)
        self.page_size = page_size
        device = backend.device
        i32 = {"dtype": torch.int32, "device": device}
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), DUMMY_SLOT, dtype=torch.long, device=device)
        self.page_table = torch.full((max_bs, max_pages_per_seq), DUMMY_SLOT // page_size, **i32)
        self.q_start = torch.arange(max_bs, **i32)
        self.q_len = torch.ones(max_bs, **i32)
        self.ctx_len = torch.ones(max_bs, **i32)
        self.num_real = torch.zeros((), dtype=torch.long, device=device)  # in-graph padded-row masks read it
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    def _metadata(self, bs: int) -> AttentionMetadata:
        kernel = KernelLayout(self.page_table[:bs], self.q_start[:bs], self.q_len[:bs], self.ctx_len[:bs], 1)
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], kernel=kernel, seqs=[])

    def _forward(self, bs: int) -> torch.Tensor:
        with forward_context(ForwardContext(bs, bs, self._metadata(bs), self.layers, num_real=self.num_real)):
            return self.model(self.input_ids[:bs], self.positions[:bs])

    @torch.no_grad()
    def capture(self) -> None:
        with frozen_gc():
            for bs in tqdm(sorted(self.sizes, reverse=True), desc="capturing decode graphs", leave=False):
                self.num_real.fill_(bs)
                self._forward(bs)  # warm-up: Triton JIT and BLAS heuristics for this shape
                graph, out = self.backend.capture(self._forward, (bs,))
                self.graphs[bs], self.outputs[bs] = graph, out
        logger.info("decode graphs captured for batch sizes %s", self.sizes)

    def fits(self, batch: ForwardBatch) -> bool:
        return len(batch.seqs) <= self.sizes[-1]

    @torch.no_grad()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [num_seqs, hidden] of a decode batch."""
        n = batch.input_ids.shape[0]
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        kernel = batch.metadata.kernel
        assert kernel.max_q_len == 1, "decode graphs take one token per sequence"
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.metadata.slot_mapping)
        width = kernel.page_table.shape[1]
        self.page_table[:n, :width].copy_(kernel.page_table)
        self.ctx_len[:n].copy_(kernel.ctx_len)
        self.num_real.fill_(n)
        if n < bs:  # padded rows: write to and read from the dummy slot only
            self.slot_mapping[n:bs].fill_(DUMMY_SLOT)
            self.page_table[n:bs].fill_(DUMMY_SLOT // self.page_size)
            self.ctx_len[n:bs].fill_(1)
        # NOTE: no forward context needed: a CUDA replay runs no Python, and the emulated backend's
        # replay re-enters `_forward`, which sets its own.
        self.graphs[bs].replay()
        self.replays += 1
        return self.outputs[bs][:n]
