"""Paged attention in Triton: one launch for a whole batch of extend, decode or mixed sequences.

Grid: (sequence, head, block of BLOCK_M queries). Each program walks its sequence's context through the
page table in blocks of BLOCK_N slots with an online softmax; queries attend causally, offset by the
sequence's cached prefix. New tokens' K/V are in the cache already (the attention op writes them first),
so prefix and new tokens are one loop. Written in Triton so the same kernel runs on ROCm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    Q, K, V, Out,
    page_table, q_start, q_len, ctx_len,
    scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_pb,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    qlen = tl.load(q_len + b)
    if mb * BLOCK_M >= qlen:
        return
    first = tl.load(q_start + b)
    clen = tl.load(ctx_len + b)
    prefix = clen - qlen
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < qlen
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < V_DIM
    q = tl.load(
        Q + (first + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # NOTE: a head dim that is no power of two is cut in two blocks (MLA's 576 = 512 + 64, 192 = 128 +
    # 64) rather than padded to the next power (1024, 256): half the registers and shared memory.
    if BLOCK_DT > 0:  # a compile-time branch: its names stay in scope below
        offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
        dt_ok = offs_dt < HEAD_DIM
        q_tail = tl.load(
            Q + (first + offs_m)[:, None] * stride_qt + h * stride_qh + offs_dt[None, :],
            mask=m_ok[:, None] & dt_ok[None, :],
            other=0.0,
        )
    kv_head = h // GROUP
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    end = tl.minimum(clen, prefix + (mb + 1) * BLOCK_M)  # causal: nothing past the block's last query
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        page = tl.load(page_table + b * stride_pb + offs_n // PAGE, mask=n_ok, other=0)
        slot = page.to(tl.int64) * PAGE + offs_n % PAGE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            K + slot[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0
        )
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
        if BLOCK_DT > 0:
            k_tail = tl.load(
                K + slot[:, None] * stride_kt + kv_head * stride_kh + offs_dt[None, :],
                mask=n_ok[:, None] & dt_ok[None, :],
                other=0.0,
            )
            s += tl.dot(q_tail, tl.trans(k_tail))
        s = s * scale
        visible = (offs_n[None, :] <= prefix + offs_m[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_dv[None, :],
            mask=n_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        Out + (first + offs_m)[:, None] * stride_ot + h * stride_oh + offs_dv[None, :],
        acc.to(Out.dtype.element_ty),
        mask=m_ok[:, None] & dv_ok[None, :],
    )


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
) -> None:
    """q: [T, H, D]; k_cache: [slots, KVH, D]; v_cache, out: [slots, KVH, Dv] and [T, H, Dv] (Dv may
    differ from D: MLA's absorbed path reads V as the first kv_lora_rank columns of its latent cache);
    page_table: [B, max_pages] int32; q_start / q_len / ctx_len: [B] int32. Writes out rows of the
    batch's real tokens."""
    batch, heads, head_dim, v_dim = q_len.shape[0], q.shape[1], q.shape[2], v_cache.shape[2]
    group = heads // k_cache.shape[1]
    block_d, block_dt = head_blocks(head_dim)
    # NOTE: MLA's latent rows (576 wide, values 512) hold a [BLOCK_M, 512] fp32 accumulator and 36 KiB of
    # K a block: fewer query rows, more warps and one buffered stage keep that in an SM (227 KiB).
    wide = head_dim > 256 or v_dim > 256
    block_m = 16 if max_q_len <= 16 else 32 if wide else 64
    grid = (batch, heads, triton.cdiv(max_q_len, block_m))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out,
        page_table, q_start, q_len, ctx_len,
        scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), page_table.stride(0),
        GROUP=group, PAGE=page_size, HEAD_DIM=head_dim, V_DIM=v_dim,
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d, BLOCK_DT=block_dt,
        BLOCK_DV=max(16, triton.next_power_of_2(v_dim)),
        **({"num_warps": 8, "num_stages": 2} if wide else {}),
    )  # fmt: skip


def head_blocks(head_dim: int) -> tuple[int, int]:
    """(main, tail) column blocks covering `head_dim`: the largest power of two that fits, then the rest
    rounded up to a power of two (0: none). tl.dot needs blocks of at least 16."""
    main = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - main
    return main, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)
