"""The toy transformer's attention kernel: causal attention over one sequence in Triton, one launch that
also writes zeros to the padded rows a graph replay carries past the real tokens.

NOTE: why not the flash kernel through torch? Its host side (slicing to the real rows, a fresh output,
then a copy into the op's preallocated one, and a second launch to zero the padded tail) costs ~45 µs
a layer on an H200 host, about what the GPU spends on a layer at N <= 512, so a benchmark of graph
replays would measure that host time instead of the graphs. This launch writes straight into the op's
output through `KernelLauncher`, so what remains between two graph segments is one kernel launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.layers.kernel_launch import KernelLauncher, cdiv, next_pow2, tensors_spec

BLOCK = 64  # query rows a program, keys a step


@triton.jit(do_not_specialize=["n", "size"])
def _causal_attention_kernel(
    Q, K, V, Out, n, size, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    mb = tl.program_id(0)
    head = tl.program_id(1)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    real = offs_m < n
    q = tl.load(
        Q + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=real[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # causal: no key past the block's last real query; a block of padded rows only reads none
    end = tl.minimum(n, (mb + 1) * BLOCK_M) * (mb * BLOCK_M < n)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k_rows = K + offs_n[:, None] * stride_kt + head * stride_kh
        k = tl.load(k_rows + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where((offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = V + offs_n[:, None] * stride_vt + head * stride_vh
        v = tl.load(v_rows + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # padded rows (n <= row < size) saw no key: written as zeros, never as 0/0
    acc = tl.where(real[:, None], acc / tl.where(real, l_i, 1.0)[:, None], 0.0)
    tl.store(
        Out + offs_m[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=(offs_m < size)[:, None] & d_ok[None, :],
    )


_launch = KernelLauncher(_causal_attention_kernel)


class CausalAttention:
    """The kernel bound to one layer's q, k, v, out ([T, H, D]; rows may be strided, a head's D values
    contiguous): a call with `n` writes causal attention over rows `:n` to rows `:n` of `out` and
    zeros to the rest. Everything but `n` (addresses, strides, the launch's cache key) is worked out
    here once, so a graph replay's call is one tuple and the kernel's launch."""

    __slots__ = ("args", "flat", "grid", "key", "size")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        tensors = (q, k, v, out)
        if any(t.stride(2) != 1 for t in tensors):
            raise ValueError("causal_attention needs each head's values contiguous")
        size, heads, head_dim = out.shape
        self.size = size
        self.grid = (max(cdiv(size, BLOCK), 1), heads)
        ptrs = tuple([t.data_ptr() for t in tensors])
        strides = tuple(x for t in tensors for x in t.stride()[:2])
        consts = (head_dim, max(16, next_pow2(head_dim)), BLOCK, BLOCK)
        # what Triton specializes on: dtypes, 16-byte alignment, strides (raw: exact), constexprs;
        # n and size are not specialized (do_not_specialize, and fewer than 2**31 rows: 32-bit)
        self.key = (*tensors_spec(tensors, ptrs), strides, consts)
        self.args = (tensors, (head_dim**-0.5, *strides, *consts))
        self.flat = ptrs

    def __call__(self, n: int) -> None:
        tensors, tail = self.args
        _launch.keyed(self.key, self.grid, (*tensors, n, self.size, *tail), (*self.flat, n, self.size, *tail))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, n: int) -> None:
    """q, k, v, out: [T, H, D] (rows may be strided, a head's D values contiguous). Rows `:n` of `out`
    get causal attention over rows `:n`; rows `n:` get zeros."""
    CausalAttention(q, k, v, out)(n)
