"""The static inputs of the engine's full graphs, and which descriptors they are captured for.

Two kinds of batch run as one full graph (`tessera.graphs.FullGraphRunner`). Decode batches (one new
token per sequence), one graph per batch size, as every serving engine does. And small extend or mixed
batches of few sequences, where a step is ~10 kernels a layer of a few microseconds each and the
piecewise graphs' eager attention breaks are a measurable part of it. One graph per token count T,
captured with a layout of S = min(T, max_seqs) + 1 sequence rows, takes any batch of at most T tokens in
at most S - 1 sequences.

All attention metadata lives in static tensors the graph reads: token ids, positions, slot mapping,
page table and the layout rows (first query row, query length, context length); a replay stages all
but the page table on the host and uploads them with one copy. An extend graph's attention was captured
as a flat launch (see PagedAttention.plan): its grid depends only on T and S, each program finding its
sequence from the query lengths. Padding never touches a real sequence's cache: a decode graph's padded
rows are one-token sequences; an extend graph's padded tokens form one more sequence of their own, and
the rows after it have no queries. Both write their K/V to the dummy slot and attend only to themselves
(no cached prefix: the page table is never read for them).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.engine.batch import ForwardBatch
from tessera.engine.kv_cache import DUMMY_SLOT
from tessera.graphs import BatchDescriptor, ForwardContext, GraphMode, forward_context
from tessera.layers.attention_metadata import AttentionMetadata, KernelLayout


def decode_batch_sizes(max_bs: int) -> list[int]:
    """nano-vllm's schedule: 1, 2, 4, 8, then every 16 up to `max_bs` (always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    return sorted(set(sizes) | {max_bs})


def full_graph_descriptors(
    max_bs: int, extend_tokens: list[int], extend_max_seqs: int, verify_len: int = 1
) -> list[BatchDescriptor]:
    """Decode graphs for batch sizes up to `max_bs` (0: none); extend graphs for each of
    `extend_tokens`, each with room for `extend_max_seqs` sequences and its padding; with speculative
    decoding (`verify_len` = 1 + K tokens a verify), extend graphs for verify batches of the decode
    graphs' sizes past `extend_max_seqs` whose tokens stay within `extend_tokens`' largest."""
    if extend_max_seqs < 1:
        raise ValueError(f"extend graphs need room for at least one sequence, got {extend_max_seqs}")
    full = GraphMode.FULL
    sizes = decode_batch_sizes(max_bs) if max_bs > 0 else []
    decode = [BatchDescriptor(full, bs, bs, True) for bs in sizes]
    extend = [BatchDescriptor(full, t, min(t, extend_max_seqs) + 1) for t in sorted(set(extend_tokens))]
    if verify_len > 1 and extend_tokens:
        top = max(extend_tokens)
        verify = [BatchDescriptor(full, bs * verify_len, bs + 1) for bs in sizes
                  if bs > extend_max_seqs and bs * verify_len <= top]  # fmt: skip
        extend = sorted(set(extend) | set(verify), key=lambda d: (d.num_tokens, d.num_seqs))
    return decode + extend


class GraphInputs:
    """The buffers full graphs read, sized for the largest descriptor: `stage` writes a batch into
    them, `forward` runs the model over them, `select` picks the descriptor that takes a batch."""

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[Any, Any],
        descriptors: list[BatchDescriptor],
        *,
        max_pages_per_seq: int,
        page_size: int,
        device: torch.device,
    ) -> None:
        if not descriptors:
            raise ValueError("full graphs need at least one descriptor")
        self.model, self.layers, self.page_size = model, layers, page_size
        self.decode = sorted(d for d in descriptors if d.uniform_decode)
        self.extend = sorted(
            (d for d in descriptors if not d.uniform_decode), key=lambda d: (d.num_tokens, d.num_seqs)
        )
        self._decode_sizes = [d.num_tokens for d in self.decode]
        max_t = max(d.num_tokens for d in descriptors)
        max_s = max(d.num_seqs for d in descriptors)
        # NOTE: every per-step input lives in one int64 buffer — token ids, positions, slot mapping (max_t
        # each), the count of real tokens, the rows that get logits (max_t), then the int32 layout rows
        # q_start, q_len, ctx_len of a descriptor (its first 3 * seqs entries) and the page-table block
        # [seqs, longest] of a batch in the bytes after them. A replay fills its pinned twin on the host
        # and uploads the part in use with one copy; the block is then copied into the page table. On a
        # slow host each torch call of a step's preparation cost 10-35 us, against a step of ~1 ms on
        # the GPU.
        self._logits_at = 3 * max_t + 1
        layout_at = 4 * max_t + 1  # int64 index where the int32 rows begin
        self._pages_at = 2 * layout_at + 3 * max_s  # int32 index where the page-table block begins
        int32s = self._pages_at + max_s * max_pages_per_seq
        self.inputs = torch.zeros(-(-int32s // 2), dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.inputs[: 3 * max_t].view(3, max_t)
        self.num_real = self.inputs[3 * max_t]  # 0-dim view: in-graph padded-row masks read it
        self.logits_rows = self.inputs[self._logits_at : layout_at]
        self.layout = self.inputs.view(torch.int32)[2 * layout_at : self._pages_at]
        self._page_block = self.inputs.view(torch.int32)[self._pages_at :]
        self.page_table = torch.full(
            (max_s, max_pages_per_seq), DUMMY_SLOT // page_size, dtype=torch.int32, device=device
        )
        # NOTE: pinned, so the upload does not block the host (a copy from pageable memory synchronizes
        # the stream and would idle the GPU for every replay's host work). The event keeps the host
        # from refilling it before the last replay's upload has read it.
        cuda = device.type == "cuda"
        self._staging = torch.zeros(self.inputs.shape, dtype=torch.long, pin_memory=cuda)
        # the same views of its host side: token rows [3, max_t], the real-token count, logits rows,
        # the layout, the page-table block
        host = self._staging.numpy()
        self._host_tokens = host[: 3 * max_t].reshape(3, max_t)
        self._host_num_real = host[3 * max_t : 3 * max_t + 1]
        self._host_logits = host[self._logits_at : layout_at]
        self._host_layout = host.view(np.int32)[2 * layout_at : self._pages_at]
        self._host_pages = host.view(np.int32)[self._pages_at :]
        self._host_tokens[2] = DUMMY_SLOT
        self._uploaded = torch.cuda.Event() if cuda else None
        # a model's third input (an EAGLE head's features), copied in on the device
        self.features: torch.Tensor | None = None
        if getattr(model, "feature_input", False):
            param = next(model.parameters())
            self.features = torch.zeros(max_t, model.config.hidden_size, dtype=param.dtype, device=device)

    @property
    def descriptors(self) -> list[BatchDescriptor]:
        return self.decode + self.extend

    def select(self, batch: ForwardBatch) -> BatchDescriptor | None:
        """The smallest captured descriptor that takes `batch`, or None."""
        n, seqs = batch.num_tokens, batch.num_seqs
        if batch.max_q_len == 1:
            i = bisect.bisect_left(self._decode_sizes, n)
            if i < len(self.decode):
                return self.decode[i]
        # an extend graph: at least n tokens, and a free sequence row for the padding if n is short
        for d in self.extend:
            if d.num_tokens >= n and seqs + (d.num_tokens > n) <= d.num_seqs:
                return d
        return None

    def forward(self, d: BatchDescriptor) -> torch.Tensor:
        t = d.num_tokens
        ctx = ForwardContext(t, t, self._metadata(d), self.layers, num_real=self.num_real)
        with forward_context(ctx):
            inputs = (self.input_ids[:t], self.positions[:t])
            return self.model(*inputs, *(() if self.features is None else (self.features[:t],)))

    def _metadata(self, d: BatchDescriptor) -> AttentionMetadata:
        q_start, q_len, ctx_len = self.layout[: 3 * d.num_seqs].view(3, d.num_seqs)
        max_q_len = 1 if d.uniform_decode else d.num_tokens
        kernel = KernelLayout(
            self.page_table[: d.num_seqs], q_start, q_len, ctx_len, max_q_len, flat=not d.uniform_decode
        )
        return AttentionMetadata(slot_mapping=self.slot_mapping[: d.num_tokens], kernel=kernel, seqs=[])

    def stage(self, d: BatchDescriptor, batch: ForwardBatch | None) -> None:
        """Write `batch`'s inputs (None: all padding, for capture) for `d` into the buffers — padded
        tokens in the dummy slot, the layout's padding rows, its page table — with one upload."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        tokens, t = self._host_tokens, d.num_tokens
        n = s = 0
        if batch is not None:
            n, s = batch.num_tokens, batch.num_seqs
            host = batch.host  # ids, positions, slots [n each]; logits rows, q_start, q_len, ctx_len [s each]
            tokens[:, :n] = host[: 3 * n].reshape(3, n)
            self._host_logits[: len(batch.host_logits)] = batch.host_logits
        # padded tokens: token 0 at position 0, writing their K/V in the dummy slot only. NOTE: set on
        # every stage, since a batch whose ids came from the device (`ForwardBatch.feed_ids`) leaves
        # placeholders (not token ids) in its rows here, and a later, smaller batch pads over them.
        tokens[:2, n:t] = 0
        tokens[2, n:t] = DUMMY_SLOT
        self._host_num_real[0] = n if batch is not None else t  # the real rows (capture: as if all were)
        layout = self._host_layout[: 3 * d.num_seqs].reshape(3, d.num_seqs)
        layout[:] = 0
        q_len, ctx_len = layout[1], layout[2]
        if batch is not None:
            q_len[:s] = host[3 * n + 2 * s : 3 * n + 3 * s]
            ctx_len[:s] = host[3 * n + 3 * s : 3 * n + 4 * s]
        pad = t - n
        if d.uniform_decode:  # one-token sequences in the dummy slot
            q_len[s:] = ctx_len[s:] = 1
        elif pad > 0:  # one sequence of all padded tokens; the rows after it run nothing
            q_len[s] = ctx_len[s] = pad
        layout[0] = np.cumsum(q_len) - q_len  # q_start
        rows, cols = self._stage_pages(d, batch)
        end = -(-(self._pages_at + rows * cols) // 2)  # the int64s in use
        self.inputs[:end].copy_(self._staging[:end], non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()
        if rows:
            self.page_table[:rows, :cols].copy_(self._page_block[: rows * cols].view(rows, cols))
        if batch is not None and batch.ids_on_device:  # after the upload, over its placeholders
            self.input_ids[:n].copy_(batch.input_ids)
        if batch is not None and self.features is not None:
            # NOTE: padded rows keep an earlier batch's features: finite, and read by no real row
            assert batch.features is not None
            self.features[:n].copy_(batch.features)

    def _stage_pages(self, d: BatchDescriptor, batch: ForwardBatch | None) -> tuple[int, int]:
        """Stage `batch`'s page table as a contiguous block (and a padded decode graph's rows after it,
        which read one cached token through it where the K/V are not passed: MLA); its shape, (0, 0)
        for capture (the table keeps its dummy pages). An extend graph's padding sequence has no cached
        prefix and reads no page."""
        if batch is None:
            return 0, 0
        table = batch.host_pages
        s, cols = table.shape
        rows = d.num_seqs if d.uniform_decode else s
        block = self._host_pages[: rows * cols].reshape(rows, cols)
        block[:s] = table
        block[s:] = DUMMY_SLOT // self.page_size
        return rows, cols

    def poison(self, d: BatchDescriptor, n: int) -> None:
        """Padded rows' token ids and positions taken from real rows in a random order (they must stay
        valid indices); the slot mapping keeps them in the dummy slot."""
        picks = torch.randint(0, n, (d.num_tokens - n,), device=self.inputs.device)
        rows = (self.input_ids, self.positions) + (() if self.features is None else (self.features,))
        for row in rows:
            row[n : d.num_tokens] = row[:n][picks]
