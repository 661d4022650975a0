"""The Triton paged-attention kernel against the torch reference (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from tessera.graphs import ForwardContext, forward_context
from tessera.layers.attention import AttentionLayer, _attend, attention
from tessera.layers.attention_metadata import AttentionMetadata, KernelLayout, SeqLayout

from .conftest import rel_err

triton_attention = pytest.importorskip("tessera.layers.triton_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(
    q_lens: list[int],
    ctx_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    v_dim: int,
) -> tuple:
    g = torch.Generator().manual_seed(sum(ctx_lens) * 31 + head_dim)
    pages_needed = [-(-c // page) for c in ctx_lens]
    perm = (
        torch.randperm(sum(pages_needed) + 4, generator=g)[: sum(pages_needed)] + 1
    )  # scattered, not page 0
    tables, cursor = [], 0
    for n in pages_needed:
        tables.append(perm[cursor : cursor + n].tolist())
        cursor += n
    num_slots = (int(perm.max()) + 1) * page
    k = torch.randn(num_slots, kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(num_slots, kv_heads, v_dim, generator=g).to(DEVICE, dtype)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(DEVICE, dtype)
    return q, k, v, tables


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "heads", "kv_heads", "head_dim", "page", "v_dim"),
    [
        ([7], [7], 4, 4, 32, 16, 32),  # one prefill
        ([1, 1, 1], [5, 40, 17], 4, 2, 64, 16, 64),  # decode batch, GQA
        ([6, 1, 20], [10, 33, 20], 8, 2, 32, 4, 32),  # mixed: chunk over a prefix, decode, prefill
        ([3, 1], [70, 9], 2, 1, 48, 1, 48),  # head dim not a power of two (32 + 16), page size 1
        ([20, 1], [45, 12], 2, 1, 192, 16, 128),  # 128 + 64 wide keys, narrower values
        ([17, 1], [30, 21], 4, 1, 576, 16, 512),  # MLA's absorbed path: 512 + 64 wide latent, MQA
        ([1, 40, 3], [33, 70, 3], 9, 3, 32, 4, 32),  # groups of 3 (SmolLM2's 9 heads on 3), mixed
        ([70, 2], [100, 30], 4, 2, 32, 16, 32),  # a sequence past SMALL_BLOCK_MAX_Q: blocks of 64 queries
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("new_kv", [False, True], ids=["all-cached", "new-tokens-passed"])
@pytest.mark.parametrize("pack", [False, True], ids=["head-a-program", "group-a-program"])
def test_kernel_matches_reference(
    q_lens, ctx_lens, heads, kv_heads, head_dim, page, v_dim, dtype, new_kv: bool, pack: bool
) -> None:
    """all-cached: every token in the cache. new-tokens-passed: this step's tokens given as K/V tensors,
    their cache slots NaN before the call: the kernel must attend to the tensors, never to those slots,
    and leave them written. group-a-program: a KV head's query heads packed into one block's rows.
    Rows past the batch's tokens (a graph replay's padding, NaN in q and out) must come out zero."""
    q, k, v, tables = _batch(q_lens, ctx_lens, heads, kv_heads, head_dim, page, dtype, v_dim)
    real, pad = q.shape[0], 21  # more padded rows than one block of queries holds
    q = torch.cat([q, torch.full((pad, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)])
    out = torch.full((real + pad, heads, v_dim), float("nan"), dtype=dtype, device=DEVICE)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    q_len = torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    q_start = torch.cumsum(q_len, 0, dtype=torch.int32) - q_len
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    seq_slots = [
        torch.tensor([t[p // page] * page + p % page for p in range(cl)], device=DEVICE)
        for cl, t in zip(ctx_lens, tables, strict=True)
    ]
    layer = AttentionLayer(k.double(), v.double(), scale, page)  # the reference's copy of the cache
    extra = None
    if new_kv:
        new = torch.cat([s[cl - ql :] for s, ql, cl in zip(seq_slots, q_lens, ctx_lens, strict=True)])
        extra = (k[new].clone(), v[new].clone(), new)
        k[new], v[new] = float("nan"), float("nan")
    triton_attention.paged_attention(q, k, v, out, table, q_start, q_len, ctx, max(q_lens), page, scale,
                                     new_kv=extra, pack=pack, zero_rows=(real, real + pad))  # fmt: skip
    assert out[real:].eq(0).all()
    if extra is not None:
        assert torch.equal(k.double(), layer.k_cache) and torch.equal(v.double(), layer.v_cache)
    start = 0
    for ql, cl, slots in zip(q_lens, ctx_lens, seq_slots, strict=True):
        ref = _attend(q[start : start + ql].double(), layer, SeqLayout(ql, cl), slots)
        err = rel_err(out[start : start + ql], ref)
        # NOTE: on a GPU a float32 tl.dot runs in TF32 (~3e-4); the interpreter computes exactly
        exact = dtype == torch.float32 and DEVICE == "cpu"
        assert err < (1e-5 if exact else 2e-3), (ql, cl, err)
        start += ql


def test_direct_launch_equals_a_launch_through_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated launches call the compiled binary (on a GPU; the interpreter has none) with the same
    result, bit for bit, as Triton's own dispatch."""
    q, k, v, tables = _batch([5, 1], [21, 9], 8, 2, 64, 16, torch.float16, 64)
    table = torch.tensor([t + [0] * (2 - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    q_len = torch.tensor([5, 1], dtype=torch.int32, device=DEVICE)
    layout = (table, torch.tensor([0, 5], dtype=torch.int32, device=DEVICE), q_len)
    ctx = torch.tensor([21, 9], dtype=torch.int32, device=DEVICE)
    launcher = triton_attention._launch_attention

    def run() -> torch.Tensor:
        out = torch.full((6, 8, 64), float("nan"), dtype=torch.float16, device=DEVICE)
        triton_attention.paged_attention(q, k, v, out, *layout, ctx, 5, 16, 0.125)
        return out

    with monkeypatch.context() as m:
        m.setattr(launcher, "direct", False)
        expected = run()
    before = launcher.direct_launches
    outs = [run() for _ in range(3)]
    assert all(torch.equal(o, expected) for o in outs)
    assert launcher.direct_launches - before == (2 if launcher.direct else 0)
    assert launcher.direct == (DEVICE == "cuda")


@pytest.mark.parametrize(
    ("head_dim", "blocks"), [(8, (16, 0)), (64, (64, 0)), (48, (32, 16)), (72, (64, 16)), (192, (128, 64)),
                             (576, (512, 64))],
)  # fmt: skip
def test_head_dim_is_cut_into_a_power_of_two_and_a_tail(head_dim: int, blocks: tuple[int, int]) -> None:
    assert triton_attention.head_blocks(head_dim) == blocks


def test_compile_variants_touches_only_the_padding_page() -> None:
    """The start-up launches of every block shape write only page 0 (the reserved padding page)."""
    page = 4
    k = torch.randn(8 * page, 2, 32, device=DEVICE, dtype=torch.float16)
    v = torch.randn(8 * page, 2, 32, device=DEVICE, dtype=torch.float16)
    k0, v0 = k.clone(), v.clone()
    # queries 1, 17 and 65 long (short, small blocks, blocks of 64), packed or not
    assert triton_attention.compile_variants(k, v, heads=4, page_size=page) == 6
    assert torch.equal(k[page:], k0[page:]) and torch.equal(v[page:], v0[page:])
    assert not torch.equal(k[:page], k0[:page])  # the dummy tokens did write their K there


def _layout(q_lens: list[int], ctx_lens: list[int], page: int, parts: bool) -> AttentionMetadata:
    """A batch whose sequence b owns pages 1 + b*8 ..: the new tokens' slots follow their cached prefix."""
    i32 = torch.int32
    table = torch.tensor([[1 + b * 8 + p for p in range(8)] for b in range(len(q_lens))], dtype=i32)
    lens = enumerate(zip(q_lens, ctx_lens, strict=True))
    slots = [table[b, p // page].item() * page + p % page for b, (ql, cl) in lens for p in range(cl - ql, cl)]

    def kernel(rows: slice) -> KernelLayout:
        ql = torch.tensor(q_lens[rows], dtype=i32)
        start = (
            torch.tensor([sum(q_lens[: rows.start or 0])], dtype=i32) + torch.cumsum(ql, 0, dtype=i32) - ql
        )
        ctx = torch.tensor(ctx_lens[rows], dtype=i32)
        return KernelLayout(
            table[rows].to(DEVICE), start.to(DEVICE), ql.to(DEVICE), ctx.to(DEVICE), max(q_lens[rows])
        )

    whole = kernel(slice(None))
    if parts:  # the first sequence alone, then the rest: two launches
        whole.parts = (kernel(slice(0, 1)), kernel(slice(1, None)))
    seqs = [SeqLayout(ql, cl) for ql, cl in zip(q_lens, ctx_lens, strict=True)]
    return AttentionMetadata(torch.tensor(slots, device=DEVICE), whole, seqs)


@pytest.mark.parametrize("parts", [False, True], ids=["one-launch", "two-launches"])
def test_a_bound_replay_equals_the_op(parts: bool) -> None:
    """What a breakable graph replays (the op bound once to its static buffers, launch plans cached per
    batch) writes the same output, zeroed padding and cache as the op itself, batch after batch."""
    heads, kv_heads, dim, page, rows = 4, 2, 32, 4, 12
    g = torch.Generator().manual_seed(7)
    cache = [torch.randn(40 * page, kv_heads, dim, generator=g).to(DEVICE, torch.float16) for _ in range(2)]
    layer = AttentionLayer(*cache, scale=dim**-0.5, page_size=page, backend="triton")
    q = torch.empty(rows, heads, dim, device=DEVICE, dtype=torch.float16)
    out = torch.empty_like(q)
    k, v = (torch.empty(rows, kv_heads, dim, device=DEVICE, dtype=torch.float16) for _ in range(2))
    bound = None
    for q_lens, ctx_lens in (([3, 1, 2], [3, 9, 6]), ([5, 2, 1], [7, 2, 20])):
        meta = _layout(q_lens, ctx_lens, page, parts)
        n = sum(q_lens)
        for t in (q, k, v):  # this batch's inputs into the static buffers, NaN padding
            t.copy_(torch.randn(t.shape, generator=g).to(DEVICE, t.dtype))
            t[n:] = float("nan")
        ctx = ForwardContext(num_tokens=rows, raw_num_tokens=n, metadata=meta, layers={(0, "attn"): layer})
        before = [c.clone() for c in cache]
        want = torch.full_like(out, float("nan"))
        with forward_context(ctx):
            attention.fn(q, k, v, want, 0)
            written = [c.clone() for c in cache]
            for c, b in zip(cache, before, strict=True):
                c.copy_(b)
            out.fill_(float("nan"))
            bound = bound or attention.bound(q, k, v, out, 0)
            bound()
        assert torch.equal(out, want) and out[n:].eq(0).all()
        assert all(torch.equal(c, w) for c, w in zip(cache, written, strict=True))


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "heads", "kv_heads", "pack"),
    [
        ([5, 0, 20, 0, 0], [9, 0, 20, 0, 0], 4, 4, False),  # rows with no queries, between and after
        ([1, 17, 0, 3], [30, 17, 0, 3], 9, 3, True),  # SmolLM2's groups packed; a block boundary at 16
        ([0, 0, 2], [0, 0, 2], 2, 1, False),  # the batch in the last row only
    ],
)
def test_a_flat_launch_equals_the_per_sequence_grid(
    q_lens: list[int], ctx_lens: list[int], heads: int, kv_heads: int, pack: bool
) -> None:
    """flat: one grid axis over the query blocks of the whole batch, sized only by bounds (the rows,
    and max_q_len = the padded row count: a full graph's launch). It must write exactly what the
    per-sequence grid writes, zeros on the padded rows, and nothing on a row past them."""
    head_dim, page, dtype = 32, 4, torch.float32
    live = [i for i, n in enumerate(q_lens) if n > 0]
    q, k, v, tables = _batch([q_lens[i] for i in live], [ctx_lens[i] for i in live], heads, kv_heads,
                             head_dim, page, dtype, head_dim)  # fmt: skip
    width = max(len(t) for t in tables)
    rows = [[0] * width for _ in q_lens]  # rows with no queries: never read
    for i, t in zip(live, tables, strict=True):
        rows[i] = t + [0] * (width - len(t))
    table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    real, padded = q.shape[0], q.shape[0] + 11
    nan = float("nan")
    q = torch.cat([q, torch.full((padded + 1 - real, heads, head_dim), nan, dtype=dtype, device=DEVICE)])
    q_len = torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    q_start = torch.cumsum(q_len, 0, dtype=torch.int32) - q_len
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    outs = []
    for flat in (False, True):
        out = torch.full((padded + 1, heads, head_dim), nan, dtype=dtype, device=DEVICE)
        longest = padded if flat else max(q_lens)
        triton_attention.paged_attention(q, k, v, out, table, q_start, q_len, ctx, longest, page, 0.2,
                                         pack=pack, zero_rows=(real, padded), flat=flat)  # fmt: skip
        outs.append(out)
    assert outs[1][real:padded].eq(0).all() and outs[1][padded].isnan().all()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0, equal_nan=True)
    assert not outs[1][:real].isnan().any()
