"""Turning scheduled sequences into the tensors of one forward: EXTEND (prefill, chunked prefill over a
cached prefix), DECODE, or both mixed in one batch — the attention metadata covers all three alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.engine.kv_cache import PagePool
from tessera.engine.sequence import Sequence
from tessera.layers.attention import AttentionMetadata, KernelLayout, SeqLayout


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_seqs] row of each sequence's last new token
    seqs: list[Sequence]


def build_batch(
    work: list[tuple[Sequence, int]], pool: PagePool, page_size: int, device: torch.device
) -> ForwardBatch:
    """`work` pairs each sequence with how many of its uncached tokens run now. Pages are allocated
    for them here; the sequences' `num_cached` advances once the forward is done (`commit`)."""
    ids: list[int] = []
    positions: list[int] = []
    spans: list[tuple[int, int]] = []
    last: list[int] = []
    page_rows: list[list[int]] = []
    context_slots: list[torch.Tensor] = []  # every token's slot, per sequence (CPU)
    offsets = torch.arange(page_size)
    for seq, n in work:
        start, end = seq.num_cached, seq.num_cached + n
        if n < 1 or end > seq.num_tokens:
            raise ValueError(f"sequence {seq.id}: cannot run {n} tokens from {start} of {seq.num_tokens}")
        need = -(-end // page_size) - len(seq.pages)
        if need > 0:
            seq.pages += pool.allocate(need)
        ids += seq.tokens(start, end)
        positions += range(start, end)
        rows = seq.pages[: -(-end // page_size)]
        page_rows.append(rows)
        # NOTE: tensor arithmetic over the page list, not a Python loop over the context: this runs
        # for every sequence on every step.
        context_slots.append((torch.tensor(rows)[:, None] * page_size + offsets).flatten()[:end])
        spans.append((start, end))
        last.append(len(ids) - 1)
    slots = torch.cat(context_slots).to(device).split([t.numel() for t in context_slots])  # one copy
    layouts = [SeqLayout(end - start, end, s) for (start, end), s in zip(spans, slots, strict=True)]
    slot_mapping = torch.cat([s[start:] for (start, _), s in zip(spans, slots, strict=True)])
    return ForwardBatch(
        input_ids=_tensor(ids, device),
        positions=_tensor(positions, device),
        metadata=AttentionMetadata(
            slot_mapping=slot_mapping,
            seqs=layouts,
            kernel=kernel_layout(layouts, page_rows, device),
        ),
        logits_indices=_tensor(last, device),
        seqs=[seq for seq, _ in work],
    )


def kernel_layout(layouts: list[SeqLayout], page_rows: list[list[int]], device: torch.device) -> KernelLayout:
    width = max(len(r) for r in page_rows)
    table = torch.tensor([r + [0] * (width - len(r)) for r in page_rows], dtype=torch.int32)
    q_len = torch.tensor([s.query_len for s in layouts], dtype=torch.int32)
    q_start = torch.cumsum(q_len, 0, dtype=torch.int32) - q_len
    ctx_len = torch.tensor([s.context_len for s in layouts], dtype=torch.int32)
    return KernelLayout(
        page_table=table.to(device),
        q_start=q_start.to(device),
        q_len=q_len.to(device),
        ctx_len=ctx_len.to(device),
        max_q_len=int(q_len.max()),
    )


def commit(work: list[tuple[Sequence, int]]) -> None:
    for seq, n in work:
        seq.num_cached += n


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
