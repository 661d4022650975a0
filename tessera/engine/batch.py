"""A step's batch: which tokens of which sequences run (`ScheduledBatch`, the scheduler's), and the tensors
of that forward (`ForwardBatch`, the model runner's): EXTEND (prefill, chunked prefill over a cached
prefix), DECODE, or both mixed in one batch — the attention metadata covers all three alike."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera.engine.sequence import Sequence
from tessera.engine.speculative import DeviceDrafts
from tessera.layers.attention_metadata import SHORT_QUERY_LEN, AttentionMetadata, KernelLayout, SeqLayout
from tessera.layers.host_copy import to_device

# A mixed batch's attention runs as two launches (short sequences, long ones) once it holds this many
# short sequences: in one launch each short sequence costs a block of 64 query rows per head, one row of
# them real; below this that waste is less than a second launch's host time.
SPLIT_MIN_SHORT = 16


@dataclass
class ScheduledBatch:
    """One forward's work: each sequence with how many of its uncached tokens run now. `sample_rows`:
    the rows whose sequence gets a token from this forward (its whole tail runs; a chunk of a longer
    prompt does not), in order. A sampling sequence with draft tokens is a verify: its row runs its last
    token and the drafts, and each of those positions gets logits (`logits_rows`)."""

    work: list[tuple[Sequence, int]]
    sample_rows: list[int]
    # work row -> how many draft tokens its decode may verify (pages and token budget reserved); only
    # the decodes with room, in the order `Scheduler.attach_drafts` takes drafts for them
    draft_room: dict[int, int] = field(default_factory=dict)
    verifies: bool = False  # some decode got draft tokens (set by `Scheduler.attach_drafts`)
    device_drafts: DeviceDrafts | None = None  # the verifies' drafts, if they are on the device

    @classmethod
    def of(cls, work: list[tuple[Sequence, int]], draft_room: dict[int, int] | None = None) -> ScheduledBatch:
        rows = [i for i, (seq, n) in enumerate(work) if seq.num_cached + n == seq.num_tokens]
        return cls(work, rows, draft_room or {})

    @property
    def proposal_seqs(self) -> list[Sequence]:
        """The decodes with draft room, in `draft_room`'s order."""
        return [self.work[i][0] for i in self.draft_room]

    @property
    def samplers(self) -> list[Sequence]:
        return [self.work[i][0] for i in self.sample_rows]

    @property
    def logits_rows(self) -> list[int]:
        """How many rows of logits each sampling sequence gets: 1, or 1 + its drafts for a verify."""
        return [1 + len(self.work[i][0].draft_token_ids) for i in self.sample_rows]

    def __len__(self) -> int:
        return len(self.work)


class ForwardBatch:
    """One forward's inputs. Built on the host (`host_rows`' arrays); its device tensors (token ids,
    positions, attention metadata, logits rows) are uploaded the first time something reads them, so a
    batch that runs as a full graph, which stages the host arrays into its own buffers with one copy,
    never uploads them (a slow host spent ~10 us a torch call, against a decode step of a few ms)."""

    def __init__(self, host: np.ndarray, host_pages: np.ndarray, device: torch.device) -> None:
        # the batch on the host, int64: token ids, positions, slot mapping [T each], then logits rows,
        # q_start, q_len, ctx_len [num_seqs each] — what a full graph's replay stages for its one upload
        self.host = host
        self.host_pages = host_pages  # the page table [num_seqs, longest], int64
        self.device = device
        self.num_seqs = b = host_pages.shape[0]
        self.num_tokens = t = (host.shape[0] - 4 * b) // 3
        self.max_q_len = int(host[3 * t + 2 * b : 3 * t + 3 * b].max())
        self.host_logits: np.ndarray = host[3 * t : 3 * t + b]  # the rows that get logits, on the host
        self.seqs: list[Sequence] = []
        self.ids_on_device = False  # the token ids came from the device: `host` holds placeholders
        # the third input of a model that takes one (an EAGLE head's features [T, hidden]), on the device
        self.features: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None  # token ids fed from the device
        self._uploaded: _OnDevice | None = None
        self._selected = False  # `select_logits` chose the logits rows
        self._logits: torch.Tensor | None = None  # the logits rows on the device, once read

    @property
    def input_ids(self) -> torch.Tensor:  # [T]
        return self._ids if self._ids is not None else self._upload().input_ids

    @property
    def positions(self) -> torch.Tensor:  # [T]
        return self._upload().positions

    @property
    def metadata(self) -> AttentionMetadata:
        return self._upload().metadata

    @property
    def logits_indices(self) -> torch.Tensor:
        """The rows that get logits [num_seqs, or as selected], on the device."""
        if self._logits is None and self._selected:
            self._logits = to_device(self.host_logits, self.device)
        return self._logits if self._logits is not None else self._upload().last_rows

    def feed_ids(self, ids: torch.Tensor) -> None:
        """Take the token ids from the device (a previous forward's output) rather than the host, so no
        one waits for them to reach the host. The host arrays keep placeholders (under tensor
        parallelism rank 0 sends the other ranks these ids from its device: `TensorParallel.publish`)."""
        if ids.shape != (self.num_tokens,):
            raise ValueError(f"{tuple(ids.shape)} token ids for a batch of {self.num_tokens} tokens")
        self._ids = ids
        self.ids_on_device = True

    def feed_at(self, rows: np.ndarray, ids: torch.Tensor) -> None:
        """`feed_ids` for some rows (int64) alone: a verify's drafts, left on the device by their
        proposer, over the host's placeholders."""
        if self._ids is None:  # the host's ids alone, not the whole batch: a full graph needs no more
            self._ids = to_device(self.host[: self.num_tokens], self.device)
        self._ids[to_device(rows, self.device)] = ids
        self.ids_on_device = True

    def select_logits(self, rows: np.ndarray) -> None:
        """Logits for these rows (int64) rather than each sequence's last one."""
        self.host_logits = rows
        self._selected = True
        self._logits = None

    @property
    def last_rows(self) -> np.ndarray:
        """The row of each sequence's last new token, in the order the batch was built from."""
        t = self.num_tokens
        return self.host[3 * t : 3 * t + self.num_seqs]

    @property
    def uploaded(self) -> bool:
        """Whether the batch's tensors went to the device (a full graph's replay needs none of them)."""
        return self._uploaded is not None

    def _upload(self) -> _OnDevice:
        """The batch's tensors on the device: two host-to-device copies, which do not block the host."""
        if self._uploaded is None:
            self._uploaded = _OnDevice.of(self)
        return self._uploaded


@dataclass
class _OnDevice:
    """A `ForwardBatch`'s tensors on the device."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    last_rows: torch.Tensor

    @classmethod
    def of(cls, batch: ForwardBatch) -> _OnDevice:
        host, t, b = batch.host, batch.num_tokens, batch.num_seqs
        q_lens, ctx_len = host[3 * t + 2 * b : 3 * t + 3 * b].tolist(), host[3 * t + 3 * b :].tolist()
        layouts = [SeqLayout(n, end) for n, end in zip(q_lens, ctx_len, strict=True)]
        on_device = to_device(host, batch.device)
        input_ids, positions, slots = on_device[: 3 * t].view(3, t)
        last, vectors = on_device[3 * t :].split([b, 3 * b])
        q_start, q_len, ctx = vectors.to(torch.int32).split(b)
        pages = to_device(batch.host_pages.astype(np.int32), batch.device)
        kernel = KernelLayout(pages, q_start, q_len, ctx, batch.max_q_len)
        short = sum(n <= SHORT_QUERY_LEN for n in q_lens)
        if SPLIT_MIN_SHORT <= short < b:
            kernel.parts = (_rows(kernel, slice(0, short), q_lens), _rows(kernel, slice(short, b), q_lens))
        metadata = AttentionMetadata(slot_mapping=slots, kernel=kernel, seqs=layouts)
        return cls(input_ids, positions, metadata, last)


def build_batch(work: list[tuple[Sequence, int]], page_size: int, device: torch.device) -> ForwardBatch:
    """`work` pairs each sequence with how many of its uncached tokens run now; each sequence holds the
    pages for them already (the scheduler reserved them). Nothing about the sequences changes here."""
    rows: list[Row] = []
    for seq, n in work:
        start = seq.num_cached
        end = start + n
        total = seq.num_tokens + len(seq.draft_token_ids)  # a verify runs the draft tokens too
        if n < 1 or end > total:
            raise ValueError(f"sequence {seq.id}: cannot run {n} tokens from {start} of {total}")
        rows.append((seq.tokens(start, end), start, seq.pages))
    batch = build_rows(rows, page_size, device)
    batch.seqs = [seq for seq, _ in work]
    return batch


# one sequence's part of a forward: its new tokens, the position of the first, and its KV pages
Row = tuple[list[int], int, list[int]]


def build_rows(rows: list[Row], page_size: int, device: torch.device) -> ForwardBatch:
    """The forward of `rows` (each row's pages cover its new tokens already); the logits rows are each
    row's last token, in `rows`' order. A draft model's forwards are built here directly."""
    return ForwardBatch(*host_rows(rows, page_size), device)


def host_rows(rows: list[Row], page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows`' forward on the host, int64: token ids, positions, slot mapping [T each], then each row's
    last token's index, q_start, q_len, ctx_len [B each] (`ForwardBatch.host`); and the page table
    [B, longest]. All a forward needs: with tensor parallelism rank 0 sends the other ranks these."""
    ids: list[int] = []
    last = [0] * len(rows)  # in `rows`' order: the logits come back in it
    page_rows: list[list[int]] = []
    q_lens: list[int] = []
    ctx_lens: list[int] = []
    # NOTE: the batch's rows hold short sequences first (a stable partition), so a mixed batch's two
    # attention launches each cover a contiguous slice of the layout tensors
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) > SHORT_QUERY_LEN)
    for i in order:
        tokens, start, pages = rows[i]
        end = start + len(tokens)
        used = -(-end // page_size)
        if used > len(pages):
            raise ValueError(f"a sequence holds {len(pages)} KV pages, {used} needed for {end} tokens")
        ids += tokens
        page_rows.append(pages if used == len(pages) else pages[:used])  # read only: no copy needed
        q_lens.append(len(tokens))
        ctx_lens.append(end)
        last[i] = len(ids) - 1
    # NOTE: the rest is array arithmetic over the whole batch and two host-to-device copies: this runs on
    # every step, for every running sequence, while the GPU waits (at 256 sequences, per-sequence tensor
    # ops were milliseconds a step). Python lists become arrays through numpy: torch.tensor(list) took
    # ~170 us for 2,048 ints on the CI host, numpy ~20.
    table = _page_table(page_rows)
    q_len = np.array(q_lens, dtype=np.int64)
    ctx_len = np.array(ctx_lens, dtype=np.int64)
    q_start = np.cumsum(q_len) - q_len
    t, b = len(ids), len(rows)
    # row r of sequence j holds position (ctx_len[j] - q_len[j]) + (r - q_start[j])
    pos = np.arange(t) + np.repeat(ctx_len - q_len - q_start, q_len)
    owner = np.repeat(np.arange(b), q_len)  # each new token's sequence
    slot_mapping = table[owner, pos // page_size] * page_size + pos % page_size
    parts = (np.array(ids, dtype=np.int64), pos, slot_mapping, np.array(last, dtype=np.int64), q_start, q_len)
    return np.concatenate((*parts, ctx_len)), table


def _rows(k: KernelLayout, rows: slice, q_lens: list[int]) -> KernelLayout:
    """The layout of a slice of the batch's sequences: views, no copies."""
    longest = max(q_lens[rows])
    return KernelLayout(k.page_table[rows], k.q_start[rows], k.q_len[rows], k.ctx_len[rows], longest)


def _page_table(page_rows: list[list[int]]) -> np.ndarray:
    """The rows as one [B, longest] int64 array, zero-padded."""
    # NOTE: one flat copy and a masked fill: padding Python lists row by row took ~0.9 ms at 256
    # sequences, this ~0.2 ms
    lengths = np.fromiter(map(len, page_rows), dtype=np.int64, count=len(page_rows))
    flat = np.fromiter(itertools.chain.from_iterable(page_rows), dtype=np.int64, count=int(lengths.sum()))
    table = np.zeros((len(page_rows), int(lengths.max())), dtype=np.int64)
    table[np.arange(table.shape[1])[None, :] < lengths[:, None]] = flat
    return table


def kernel_layout(layouts: list[SeqLayout], page_rows: list[list[int]], device: torch.device) -> KernelLayout:
    table = torch.from_numpy(_page_table(page_rows)).to(torch.int32)
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
