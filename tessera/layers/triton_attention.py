"""Paged attention in Triton: one launch for a whole batch of extend, decode or mixed sequences.

Grid: (sequence, head, block of BLOCK_M queries), or with PACK (sequence, KV head, block of positions),
the block's rows then being (position, query head of the group) pairs that share every K/V load. Each
program walks its sequence's context in blocks of BLOCK_N tokens with an online softmax; queries attend
causally, offset by the sequence's cached prefix.
The cached prefix is read through the page table. With `new_kv`, this step's new tokens are read from
the K/V tensors the layer just computed, and one program row per (position, KV head) writes them to
their cache slots: no separate cache-write launches (two fewer eager launches a layer under piecewise graphs)
and no program reads a slot another may still be writing. Without it (MLA, whose op wrote the latent
before), every token comes from the cache. Written in Triton so the same kernel runs on ROCm.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from tessera.layers.attention_metadata import SHORT_QUERY_LEN
from tessera.layers.kernel_launch import KernelLauncher, cdiv, next_pow2, tensors_spec

PACK_MIN_PROGRAMS = 32  # (sequence, KV head) pairs a packed launch needs
# Batches whose longest sequence has at most this many new tokens get blocks of 16 query rows (more
# programs, each with less work: small batches are latency-bound); longer ones get 64.
# NOTE: on an H200 (attention_blocks_h200.json) 16 rows took 2-15% less time than 64 for one sequence
# of 32-64 new tokens at Llama-3-8B's shapes, 4-6% at SmolLM2's; at 128 tokens in one sequence 64 rows
# won by 5-27%
SMALL_BLOCK_MAX_Q = 64


@triton.jit
def _attend_block(
    q, q_tail, k_rows, v_rows, offs_n, n_ok, offs_m, prefix, scale, m_i, l_i, acc,
    offs_d, d_ok, offs_dt, dt_ok, offs_dv, dv_ok, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over BLOCK_N keys whose rows start at `k_rows` / `v_rows` (pointers)."""
    k = tl.load(k_rows[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
    if BLOCK_DT > 0:
        k_tail = tl.load(k_rows[:, None] + offs_dt[None, :], mask=n_ok[:, None] & dt_ok[None, :], other=0.0)
        s += tl.dot(q_tail, tl.trans(k_tail))
    s = s * scale
    visible = (offs_n[None, :] <= prefix + offs_m[:, None]) & n_ok[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_rows[:, None] + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _copy_rows(src_rows, dst_rows, offs, rows_ok, cols_ok):
    """dst[row, offs] = src[row, offs] for rows given as pointers to their first element."""
    mask = rows_ok[:, None] & cols_ok[None, :]
    tl.store(
        dst_rows[:, None] + offs[None, :], tl.load(src_rows[:, None] + offs[None, :], mask=mask), mask=mask
    )


# NOTE: the batch-layout pointers (often row slices, see KernelLayout.parts) and the page table's row
# stride vary from batch to batch; specializing on their alignment would compile new variants while
# serving (a second or so each) for no gain: they are read as scalars
@triton.jit(
    do_not_specialize=["stride_pb", "num_seqs", "zero_from", "zero_to"],
    do_not_specialize_on_alignment=["slot_mapping", "page_table", "q_start", "q_len", "ctx_len"],
)
def _paged_attention_kernel(
    Q, K, V, Out, NK, NV, slot_mapping,
    page_table, q_start, q_len, ctx_len,
    num_seqs, zero_from, zero_to, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_pb,
    stride_nkt, stride_nkh, stride_nvt, stride_nvh,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
    HAS_NEW: tl.constexpr, PACK: tl.constexpr, GROUP_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_DV: tl.constexpr, FLAT: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)  # a sequence; `num_seqs`: the rows `zero_from .. zero_to` of Out
    hp = tl.program_id(1)  # a query head; with PACK, a KV head and every query head of its group
    mb = tl.program_id(2)
    POS = BLOCK_M // GROUP_P  # query positions a block covers
    if FLAT:  # axis 0 counts the query blocks of the whole batch: find this one's sequence
        seq = tl.arange(0, BLOCK_S)
        blocks = (tl.load(q_len + seq, mask=seq < num_seqs, other=0) + POS - 1) // POS
        ends = tl.cumsum(blocks, 0)
        owner = tl.sum((ends <= b).to(tl.int32))  # sequences whose blocks all come before this one
        first_block = tl.sum(tl.where(seq < owner, blocks, 0))
        # past the last block: the first program zeroes the padded rows (b == num_seqs), the rest leave
        mb = tl.where(owner < num_seqs, b - first_block, 0)
        b = tl.where(owner < num_seqs, owner, num_seqs + b - tl.sum(blocks))
    r = tl.arange(0, BLOCK_M)
    if PACK:  # rows are (position, head of the group) pairs: the group shares every K/V load
        kv_head = hp
        head = hp * GROUP + r % GROUP_P
        offs_m = mb * POS + r // GROUP_P  # query index within the sequence
        head_ok = r % GROUP_P < GROUP
        lead = r % GROUP_P == 0  # one row a position writes its new K/V
    else:
        kv_head = hp // GROUP
        head = hp
        offs_m = mb * BLOCK_M + r
        head_ok = r >= 0
        lead = (r * 0 + hp % GROUP) == 0  # the group's first head writes its new K/V
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < V_DIM
    if b == num_seqs:  # a graph replay's padded rows: zeros, so padding never leaks past attention
        zeros = tl.zeros([BLOCK_M, BLOCK_DV], dtype=Out.dtype.element_ty)
        for start in range(zero_from, zero_to, tl.num_programs(2) * POS):
            rows = start + offs_m
            ok = head_ok & (rows < zero_to)
            out_rows = Out + rows * stride_ot + head * stride_oh
            tl.store(out_rows[:, None] + offs_dv[None, :], zeros, mask=ok[:, None] & dv_ok[None, :])
        return
    if b > num_seqs:  # FLAT's programs past the batch's blocks
        return
    qlen = tl.load(q_len + b)
    if mb * POS >= qlen:
        return
    first = tl.load(q_start + b)
    clen = tl.load(ctx_len + b)
    prefix = clen - qlen
    m_ok = (offs_m < qlen) & head_ok
    writer = m_ok & lead
    q_rows = Q + (first + offs_m) * stride_qt + head * stride_qh
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    # NOTE: a head dim that is no power of two is cut in two blocks (MLA's 576 = 512 + 64, 192 = 128 +
    # 64) rather than padded to the next power (1024, 256): half the registers and shared memory.
    if BLOCK_DT > 0:  # a compile-time branch: its names stay in scope below
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_ok = offs_dt < HEAD_DIM
        q_tail = tl.load(q_rows[:, None] + offs_dt[None, :], mask=m_ok[:, None] & dt_ok[None, :], other=0.0)
    else:
        offs_dt, dt_ok, q_tail = offs_d, d_ok, q
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    end = tl.minimum(clen, prefix + (mb + 1) * POS)  # causal: nothing past the block's last query
    if HAS_NEW:  # this block's new tokens into their cache slots, once per KV head
        slots = tl.load(slot_mapping + first + offs_m, mask=writer, other=0).to(tl.int64)
        nk_rows = NK + (first + offs_m) * stride_nkt + kv_head * stride_nkh
        nv_rows = NV + (first + offs_m) * stride_nvt + kv_head * stride_nvh
        k_dst = K + slots * stride_kt + kv_head * stride_kh
        v_dst = V + slots * stride_vt + kv_head * stride_vh
        _copy_rows(nk_rows, k_dst, offs_d, writer, d_ok)
        if BLOCK_DT > 0:
            _copy_rows(nk_rows, k_dst, offs_dt, writer, dt_ok)
        _copy_rows(nv_rows, v_dst, offs_dv, writer, dv_ok)
        cached_end = prefix
    else:
        cached_end = end
    for start in range(0, cached_end, BLOCK_N):  # the cache, through the page table
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < cached_end
        page = tl.load(page_table + b * stride_pb + offs_n // PAGE, mask=n_ok, other=0)
        slot = page.to(tl.int64) * PAGE + offs_n % PAGE
        m_i, l_i, acc = _attend_block(
            q, q_tail, K + slot * stride_kt + kv_head * stride_kh, V + slot * stride_vt + kv_head * stride_vh,
            offs_n, n_ok, offs_m, prefix, scale, m_i, l_i, acc, offs_d, d_ok, offs_dt, dt_ok, offs_dv, dv_ok,
            BLOCK_DT,
        )  # fmt: skip
    if HAS_NEW:
        for start in range(prefix, end, BLOCK_N):  # this step's tokens, from the layer's K/V
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            rows = first + offs_n - prefix
            m_i, l_i, acc = _attend_block(
                q, q_tail, NK + rows * stride_nkt + kv_head * stride_nkh,
                NV + rows * stride_nvt + kv_head * stride_nvh,
                offs_n, n_ok, offs_m, prefix, scale, m_i, l_i, acc, offs_d, d_ok, offs_dt, dt_ok, offs_dv,
                dv_ok, BLOCK_DT,
            )  # fmt: skip
    acc = acc / l_i[:, None]
    out_rows = Out + (first + offs_m) * stride_ot + head * stride_oh
    tl.store(
        out_rows[:, None] + offs_dv[None, :],
        acc.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & dv_ok[None, :],
    )


_launch_attention = KernelLauncher(_paged_attention_kernel)
_PLAN_KEYS: dict[tuple, tuple] = {}  # each plan key once: equal keys of later batches are the same object


class _Plan(NamedTuple):
    """What a batch layout fixes for the launch of every layer with the same head shapes."""

    key: tuple
    grid: tuple[int, int, int]
    tensors: tuple[torch.Tensor, ...]  # slot mapping (or a placeholder), page table, q_start, q_len, ctx_len
    ptrs: tuple[int, ...]  # their addresses
    num_seqs: int
    stride_pb: int
    consts: tuple
    options: dict[str, int]


class PagedAttention:
    """The kernel bound to one layer's tensors: queries, caches, output and (optionally) this step's new
    K/V. What depends only on those (addresses, strides, their part of the launch's cache key) is
    worked out here, once; `plan` works out what a batch layout fixes (block shapes, grid, the layout's
    addresses), which every layer of a step shares; `launch` combines the two.

    NOTE: attention runs eagerly between graph segments on every layer of every step, where host time is
    time the GPU waits for. A breakable graph replays it over the same static buffers each time, so it
    binds them once at capture; with the plan cached per batch, a layer's launch is a tuple and the
    compiled binary's call (`profile_engine_h200.txt`: 14.3 us a replayed layer bound this way, 21.4
    through `paged_attention`, 8.6 for the binary alone, on one H200 host)."""

    __slots__ = ("_binary", "_plan_key", "key", "ptrs", "scale", "shape", "strides", "tensors")

    def __init__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor,
        page_size: int,
        scale: float,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        nk, nv = new_kv if new_kv is not None else (k_cache, v_cache)  # unread placeholders
        self.tensors = (q, k_cache, v_cache, out, nk, nv)
        self.ptrs = tuple([t.data_ptr() for t in self.tensors])
        self.strides = tuple(x for t in self.tensors for x in t.stride()[:2])
        self.scale = float(scale)
        # what Triton specializes the six on: dtype, 16-byte alignment, strides (raw: they are exact)
        self.key = (*tensors_spec(self.tensors, self.ptrs), self.strides)
        # (heads, KV heads, head dim, value dim, page size, new K/V given): what a launch plan depends on
        self.shape = (
            q.shape[1],
            k_cache.shape[1],
            q.shape[2],
            v_cache.shape[2],
            page_size,
            new_kv is not None,
        )
        # the binary of the last plan key launched directly: the same key (interned, so compared by
        # identity) goes straight to it, skipping the launcher's key hashing and lookup
        self._plan_key: tuple | None = None
        self._binary: Any = None

    def plan(
        self,
        page_table: torch.Tensor,
        q_start: torch.Tensor,
        q_len: torch.Tensor,
        ctx_len: torch.Tensor,
        max_q_len: int,
        slot_mapping: torch.Tensor | None = None,
        pack: bool | None = None,
        flat: bool = False,
    ) -> _Plan:
        """The launch plan of a batch layout; valid for every PagedAttention with the same `shape`.
        `slot_mapping`: where the new tokens' K/V go (needed with `new_kv`). `flat`: the grid's first
        axis counts query blocks of the whole batch, each program finding its sequence on the device,
        so the grid depends only on bounds: the number of layout rows and `max_q_len`, which must then
        be at least the batch's total query rows (a full graph's captured launch; see KernelLayout)."""
        heads, kv_heads, head_dim, v_dim, page_size, has_new = self.shape
        if has_new and slot_mapping is None:
            raise ValueError("paged attention with new K/V needs their slot mapping")
        batch = q_len.shape[0]
        group = heads // kv_heads
        short = max_q_len <= SHORT_QUERY_LEN
        if pack is None:
            # NOTE: decode-like batches and wide groups (MLA's 16 heads on one latent), once there are
            # enough (sequence, KV head) programs to fill the GPU: one program a sequence would leave a
            # long single-sequence decode on one SM, where a program a head spreads it over the chip
            pack = group > 1 and (short or group >= 8) and batch * kv_heads >= PACK_MIN_PROGRAMS
        small = max_q_len <= SMALL_BLOCK_MAX_Q
        block_m, group_p, blocks, options = _blocks(head_dim, v_dim, small, group if pack else 1)
        slots = slot_mapping if has_new and slot_mapping is not None else q_start  # unread placeholder
        tensors = (slots, page_table, q_start, q_len, ctx_len)
        stride_pb = page_table.stride(0)  # not specialized on (it varies batch to batch) but for its width
        block_s = next_pow2(batch) if flat else 1
        consts = (group, page_size, head_dim, v_dim, has_new, pack, group_p, block_m, 32, *blocks)
        consts += (flat, block_s)
        key = (tuple([t.dtype for t in tensors]), stride_pb < 2**31, consts)
        key = _PLAN_KEYS.setdefault(key, key)
        # NOTE: a last row of programs zeroes the padded rows; the row counts are not specialized on.
        # Flat: a sequence of q query rows has cdiv(q, positions a block covers) blocks, at most
        # cdiv(max_q_len, pos) + batch - 1 in all, and one more program zeroes.
        pos, heads_axis = block_m // group_p, kv_heads if pack else heads
        if flat:
            grid = (cdiv(max_q_len, pos) + batch + 1, heads_axis, 1)
        else:
            grid = (batch + 1, heads_axis, cdiv(max_q_len, pos))
        ptrs = tuple([t.data_ptr() for t in tensors])
        return _Plan(key, grid, tensors, ptrs, batch, stride_pb, consts, options)

    def launch(self, plan: _Plan, zero_rows: tuple[int, int] = (0, 0)) -> None:
        """Attention of `plan`'s batch; rows `zero_rows[0] .. zero_rows[1]` of the output get zeros."""
        s = self.strides
        tail = (plan.num_seqs, *zero_rows, self.scale, *s[:8], plan.stride_pb, *s[8:], *plan.consts)
        if plan.key is self._plan_key:
            self._binary[plan.grid](*self.ptrs, *plan.ptrs, *tail)
            return
        launcher, key = _launch_attention, (self.key, plan.key)
        direct = launcher.direct_launches
        launcher.keyed(key, plan.grid, (*self.tensors, *plan.tensors, *tail), (*self.ptrs, *plan.ptrs, *tail),
                       **plan.options)  # fmt: skip
        if launcher.direct_launches > direct:  # the binary takes this launch's arguments: keep it
            self._plan_key, self._binary = plan.key, launcher.compiled(key, **plan.options)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    page_table: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    ctx_len: torch.Tensor,
    max_q_len: int,
    page_size: int,
    scale: float,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    pack: bool | None = None,
    zero_rows: tuple[int, int] = (0, 0),
    flat: bool = False,
) -> None:
    """q: [T, H, D]; k_cache: [slots, KVH, D]; v_cache, out: [slots, KVH, Dv] and [T, H, Dv] (Dv may
    differ from D: MLA's absorbed path reads V as the first kv_lora_rank columns of its latent cache);
    page_table: [B, max_pages] int32; q_start / q_len / ctx_len: [B] int32. Writes out rows of the
    batch's real tokens. `new_kv` = (k [T, KVH, D], v [T, KVH, Dv], slot_mapping [T]): this step's
    tokens, attended from these tensors and written to the cache here; without it they must be in the
    cache already. `pack`: one program serves all query heads of a KV head, so the group shares each
    K/V load (None: for decode-like batches and groups of 8 or more, with enough programs).
    `zero_rows` = (first, end): rows of `out` this launch writes zeros to (a graph replay's padding,
    at no cost beyond a few more programs in a launch made anyway). `flat`: see PagedAttention.plan."""
    bound = PagedAttention(q, k_cache, v_cache, out, page_size, scale, new_kv[:2] if new_kv else None)
    slots = new_kv[2] if new_kv is not None else None
    bound.launch(bound.plan(page_table, q_start, q_len, ctx_len, max_q_len, slots, pack, flat), zero_rows)


def compile_variants(k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, page_size: int) -> int:
    """Launch each block shape a batch can pick (short or long queries, heads packed or not) once, on
    a dummy batch whose every token reads and writes page 0 (the reserved padding page), so no variant
    compiles in the middle of serving. Returns how many were launched."""
    kv_heads, head_dim, v_dim = k_cache.shape[1], k_cache.shape[2], v_cache.shape[2]
    dev, i32 = k_cache.device, torch.int32
    packs = (False, True) if heads > kv_heads else (False,)
    q_lens = sorted({1, SHORT_QUERY_LEN + 1, SMALL_BLOCK_MAX_Q + 1})  # every block shape's first length
    for q_len in q_lens:
        pages = cdiv(q_len, page_size)
        q = torch.zeros(q_len, heads, head_dim, dtype=k_cache.dtype, device=dev)
        out = torch.empty(q_len, heads, v_dim, dtype=k_cache.dtype, device=dev)
        k = torch.zeros(q_len, kv_heads, head_dim, dtype=k_cache.dtype, device=dev)
        v = torch.zeros(q_len, kv_heads, v_dim, dtype=k_cache.dtype, device=dev)
        lengths = torch.full((1,), q_len, dtype=i32, device=dev)
        table, start = torch.zeros(1, pages, dtype=i32, device=dev), torch.zeros(1, dtype=i32, device=dev)
        slots = torch.zeros(q_len, dtype=torch.int64, device=dev)
        for pack in packs:
            paged_attention(q, k_cache, v_cache, out, table, start, lengths, lengths, q_len, page_size, 1.0,
                            new_kv=(k, v, slots), pack=pack)  # fmt: skip
    return len(q_lens) * len(packs)


@functools.cache
def _blocks(
    head_dim: int, v_dim: int, short: bool, group: int
) -> tuple[int, int, tuple[int, int, int], dict[str, int]]:
    """(BLOCK_M, rows a position takes, (BLOCK_D, BLOCK_DT, BLOCK_DV), launch options) for these widths;
    `short`: no sequence has more than SMALL_BLOCK_MAX_Q queries; `group`: query heads packed into one
    block's rows (1: none)."""
    block_d, block_dt = head_blocks(head_dim)
    # NOTE: MLA's latent rows (576 wide, values 512) hold a [BLOCK_M, 512] fp32 accumulator and 36 KiB of
    # K a block: fewer query rows, more warps and one buffered stage keep that in an SM (227 KiB).
    wide = head_dim > 256 or v_dim > 256
    group_p = next_pow2(group)
    block_m = max(16 if short else 32 if wide else 64, group_p)
    options = {"num_warps": 8, "num_stages": 2} if wide else {}
    return block_m, group_p, (block_d, block_dt, max(16, next_pow2(v_dim))), options


def head_blocks(head_dim: int) -> tuple[int, int]:
    """(main, tail) column blocks covering `head_dim`: the largest power of two that fits, then the rest
    rounded up to a power of two (0: none). tl.dot needs blocks of at least 16."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, (max(16, next_pow2(rest)) if rest > 0 else 0)
