"""Full CUDA graphs: the whole forward, attention included, as one graph per shape.

Two kinds of batch get them. Decode batches (one new token per sequence), one graph per batch size, as
every serving engine does. And small extend or mixed batches of few sequences, where a step is ~10
kernels a layer of a few microseconds each and the piecewise graphs' 30 eager attention breaks are a
measurable part of it (SmolLM2 on an H200: a full graph takes 0.91-0.93x the piecewise step at 16-128
tokens). One graph per token count T, captured with a layout of S = min(T, max_seqs) + 1 sequence rows,
takes any batch of at most T tokens in at most S - 1 sequences.

All attention metadata lives in static tensors the graph reads: token ids, positions, slot mapping,
page table and the layout rows (first query row, query length, context length); a replay stages all
but the page table on the host and uploads them with one copy. An extend graph's
attention was captured as a flat launch (see PagedAttention.plan): its grid depends only on T and S,
each program finding its sequence from the query lengths. Padding never touches a real sequence's
cache: a decode graph's padded rows are one-token sequences; an extend graph's padded tokens form one
more sequence of their own, and the rows after it have no queries. Both write their K/V to the dummy
slot and attend only to themselves (no cached prefix: the page table is never read for them). Graphs
share the memory pool of the piecewise graphs (the same backend).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tessera.engine.batch import ForwardBatch
from tessera.engine.kv_cache import DUMMY_SLOT
from tessera.graphs import ForwardContext, PaddingLeakError, forward_context
from tessera.graphs.hygiene import frozen_gc
from tessera.graphs.platform import Graph, GraphBackend
from tessera.graphs.runner import changed_rows
from tessera.layers.attention import AttentionMetadata, KernelLayout

logger = logging.getLogger("tessera")


@dataclass(frozen=True, order=True)
class Shape:
    """What one full graph was captured for: `tokens` rows, a layout of `seqs` sequence rows, and
    whether it is a decode graph (every row its own sequence: tokens == seqs)."""

    decode: bool
    tokens: int
    seqs: int

    @property
    def max_q_len(self) -> int:
        return 1 if self.decode else self.tokens


def decode_batch_sizes(max_bs: int) -> list[int]:
    """nano-vllm's schedule: 1, 2, 4, 8, then every 16 up to `max_bs` (always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs] + list(range(16, max_bs + 1, 16))
    return sorted(set(sizes) | {max_bs})


def graph_shapes(max_bs: int, extend_tokens: list[int], extend_max_seqs: int) -> list[Shape]:
    """Decode graphs for batch sizes up to `max_bs` (0: none); extend graphs for each of
    `extend_tokens`, each with room for `extend_max_seqs` sequences and its padding."""
    if extend_max_seqs < 1:
        raise ValueError(f"extend graphs need room for at least one sequence, got {extend_max_seqs}")
    shapes = [Shape(True, bs, bs) for bs in decode_batch_sizes(max_bs)] if max_bs > 0 else []
    return shapes + [Shape(False, t, min(t, extend_max_seqs) + 1) for t in sorted(set(extend_tokens))]


class FullGraphRunner:
    def __init__(
        self,
        model: nn.Module,
        backend: GraphBackend,
        layers: dict[Any, Any],
        shapes: list[Shape],
        *,
        max_pages_per_seq: int,
        page_size: int,
        poison_padding: bool = False,
    ) -> None:
        """`poison_padding` (debug): every padded replay runs again with the padded rows' token ids
        and positions shuffled from real rows, and must leave the real rows' outputs bit-identical."""
        if not shapes:
            raise ValueError("a full-graph runner needs at least one shape")
        self.model, self.backend, self.layers = model, backend, layers
        self.shapes = sorted(shapes)
        self.decode = [s for s in self.shapes if s.decode]
        self.extend = [s for s in self.shapes if not s.decode]
        self.sizes = [s.tokens for s in self.decode]  # decode batch sizes
        self.page_size, self.poison_padding = page_size, poison_padding
        max_t, max_s = max(s.tokens for s in shapes), max(s.seqs for s in shapes)
        device = backend.device
        # NOTE: every per-step input but the page table lives in one int64 buffer — token ids,
        # positions, slot mapping (max_t each), the count of real tokens, and the int32 layout rows
        # q_start, q_len, ctx_len of a shape (its first 3 * seqs entries) in the bytes after them. A
        # replay fills its pinned twin on the host and uploads it with one copy: on a slow host each
        # torch call of a step's preparation cost 25-35 us, against a step of ~1 ms on the GPU.
        layout_at = 3 * max_t + 1  # int64 index where the int32 layout rows begin
        self.inputs = torch.zeros(layout_at + -(-3 * max_s // 2), dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.inputs[: 3 * max_t].view(3, max_t)
        self.num_real = self.inputs[3 * max_t]  # 0-dim view: in-graph padded-row masks read it
        self.layout = self.inputs[layout_at:].view(torch.int32)[: 3 * max_s]
        self.page_table = torch.full(
            (max_s, max_pages_per_seq), DUMMY_SLOT // page_size, dtype=torch.int32, device=device
        )
        # NOTE: pinned, so the upload does not block the host (a copy from pageable memory synchronizes
        # the stream and would idle the GPU for every replay's host work). The event keeps the host
        # from refilling it before the last replay's upload has read it.
        cuda = device.type == "cuda"
        self._staging = torch.zeros(self.inputs.shape, dtype=torch.long, pin_memory=cuda)
        # the same views of its host side: token rows [3, max_t], the real-token count, the layout
        host = self._staging.numpy()
        self._host_tokens = host[: 3 * max_t].reshape(3, max_t)
        self._host_num_real = host[3 * max_t : 3 * max_t + 1]
        self._host_layout = host[layout_at:].view(np.int32)
        self._host_tokens[2] = DUMMY_SLOT
        self._uploaded = torch.cuda.Event() if cuda else None
        self.graphs: dict[Shape, Graph] = {}
        self.outputs: dict[Shape, torch.Tensor] = {}
        self.replays = {"decode": 0, "extend": 0}

    def _metadata(self, shape: Shape) -> AttentionMetadata:
        q_start, q_len, ctx_len = self._layout(shape)
        kernel = KernelLayout(
            self.page_table[: shape.seqs], q_start, q_len, ctx_len, shape.max_q_len, flat=not shape.decode
        )
        return AttentionMetadata(slot_mapping=self.slot_mapping[: shape.tokens], kernel=kernel, seqs=[])

    def _forward(self, shape: Shape) -> torch.Tensor:
        t = shape.tokens
        ctx = ForwardContext(t, t, self._metadata(shape), self.layers, num_real=self.num_real)
        with forward_context(ctx):
            return self.model(self.input_ids[:t], self.positions[:t])

    @torch.no_grad()
    def capture(self) -> None:
        with frozen_gc():
            for shape in tqdm(sorted(self.shapes, reverse=True, key=lambda s: s.tokens),
                              desc="capturing full graphs", leave=False):  # fmt: skip
                self._stage(shape, None)  # all padding: the dummy slot only
                self._forward(shape)  # warm-up: Triton JIT and BLAS heuristics for this shape
                graph, out = self.backend.capture(self._forward, (shape,))
                self.graphs[shape], self.outputs[shape] = graph, out
        logger.info(
            "full graphs captured: decode batch sizes %s; extend token counts %s",
            self.sizes,
            [s.tokens for s in self.extend],
        )

    def shape_for(self, batch: ForwardBatch) -> Shape | None:
        """The smallest captured shape that takes `batch`, or None."""
        n, seqs = batch.input_ids.shape[0], len(batch.metadata.seqs)
        if batch.metadata.kernel.max_q_len == 1:
            i = bisect.bisect_left(self.sizes, n)
            if i < len(self.sizes):
                return self.decode[i]
        # an extend graph: at least n tokens, and a free sequence row for the padding if n is short
        for shape in self.extend:
            if shape.tokens >= n and seqs + (shape.tokens > n) <= shape.seqs:
                return shape
        return None

    @torch.no_grad()
    def run(self, batch: ForwardBatch, shape: Shape) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of `batch` through the graph of `shape` (see `shape_for`)."""
        n, meta = batch.input_ids.shape[0], batch.metadata
        s = len(meta.seqs)
        self._stage(shape, batch)
        width = meta.kernel.page_table.shape[1]
        self.page_table[:s, :width].copy_(meta.kernel.page_table)
        if shape.decode and s < shape.seqs:
            # padded decode rows read one cached token through it where the K/V are not passed (MLA);
            # an extend graph's padding sequence has no cached prefix and reads no page
            self.page_table[s : shape.seqs].fill_(DUMMY_SLOT // self.page_size)
        # NOTE: no forward context needed: a CUDA replay runs no Python, and the emulated backend's
        # replay re-enters `_forward`, which sets its own.
        self.graphs[shape].replay()
        self.replays["decode" if shape.decode else "extend"] += 1
        out = self.outputs[shape]
        if self.poison_padding and n < shape.tokens:
            self._poison_check(out, shape, n)
        return out[:n]

    def _poison_check(self, out: torch.Tensor, shape: Shape, n: int) -> None:
        """Replay with the padded rows' ids and positions taken from real rows in a random order (they
        must stay valid indices); the slot mapping keeps them in the dummy slot."""
        clean = out[:n].clone()
        picks = torch.randint(0, n, (shape.tokens - n,), device=out.device)
        for row in (self.input_ids, self.positions):
            row[n : shape.tokens] = row[:n][picks]
        self.graphs[shape].replay()
        bad = changed_rows(clean, out[:n])
        if bad.numel():
            raise PaddingLeakError(
                f"full graph of {shape.tokens} tokens: {bad.numel()} of {n} real rows (first: "
                f"{bad[:8].tolist()}) changed when padded rows {n}..{shape.tokens - 1} were poisoned; "
                "an op mixes padded rows into real ones"
            )

    def _stage(self, shape: Shape, batch: ForwardBatch | None) -> None:
        """Write `batch`'s inputs (None: all padding, for capture) for `shape` into the pinned twin of
        `inputs` — padded tokens in the dummy slot, the layout's padding rows — and upload it."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        tokens, t = self._host_tokens, shape.tokens
        n = s = 0
        if batch is not None:
            n, s = batch.input_ids.shape[0], len(batch.metadata.seqs)
            host = batch.host  # ids, positions, slots [n each]; logits rows, q_start, q_len, ctx_len [s each]
            tokens[:, :n] = host[: 3 * n].reshape(3, n)
        tokens[2, n:t] = DUMMY_SLOT  # padded tokens write their K/V there only
        self._host_num_real[0] = n if batch is not None else t  # the real rows (capture: as if all were)
        rows = self._host_layout[: 3 * shape.seqs].reshape(3, shape.seqs)
        rows[:] = 0
        q_len, ctx_len = rows[1], rows[2]
        if batch is not None:
            q_len[:s] = host[3 * n + 2 * s : 3 * n + 3 * s]
            ctx_len[:s] = host[3 * n + 3 * s : 3 * n + 4 * s]
        pad = t - n
        if shape.decode:  # one-token sequences in the dummy slot
            q_len[s:] = ctx_len[s:] = 1
        elif pad > 0:  # one sequence of all padded tokens; the rows after it run nothing
            q_len[s] = ctx_len[s] = pad
        rows[0] = np.cumsum(q_len) - q_len  # q_start
        self.inputs.copy_(self._staging, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()

    def _layout(self, shape: Shape) -> torch.Tensor:
        return self.layout[: 3 * shape.seqs].view(3, shape.seqs)
