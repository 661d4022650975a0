"""What attention needs to know about a batch: its sequences' layout on the host and as tensors, and
where each new token's K/V goes. The engine's batch builder fills it; attention backends read it from the
forward context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Sequences with at most this many new tokens are "short" (decode, speculative verify, small extends):
# attention gives them blocks of 16 query rows, where longer ones get 64
SHORT_QUERY_LEN = 16


@dataclass
class SeqLayout:
    """One sequence of a batch: `query_len` new tokens after `context_len - query_len` cached ones."""

    query_len: int
    context_len: int


@dataclass
class KernelLayout:
    """The batch layout as tensors, for a kernel that runs the whole batch in one launch."""

    page_table: torch.Tensor  # [B, max_pages] int32
    q_start: torch.Tensor  # [B] int32, first row of each sequence's queries
    q_len: torch.Tensor  # [B] int32
    ctx_len: torch.Tensor  # [B] int32, cached + new tokens
    max_q_len: int
    # a mixed batch's short sequences (first) and long ones as row slices of the above: one launch
    # each, so decode rows are not computed in blocks sized for a long prefill (empty: one launch)
    parts: tuple[KernelLayout, ...] = ()
    # one launch whose grid depends only on the number of rows and on max_q_len, here at least the
    # batch's total query rows: what a full graph captures (rows with no queries cost a program each)
    flat: bool = False


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    kernel: KernelLayout  # the batch as tensors (page table, lengths)
    seqs: list[SeqLayout]  # the same on the host, for the per-sequence reference backend
    # per-batch values a split op derives once and every layer reuses (MLA's per-path layouts)
    derived: dict[str, Any] = field(default_factory=dict, repr=False)
