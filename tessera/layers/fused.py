"""Fused elementwise kernels in Triton: residual-add + RMSNorm, rotary embedding of q and k, SiLU·mul.

Unfused, a Llama layer ran 49 kernels (RMSNorm alone is 8: cast, pow, mean, add, rsqrt, mul, cast, mul)
and at small batches a step costs its kernel count more than its FLOPs: once graphs remove launches,
each kernel still costs its fixed ~2 µs on the GPU. With these three (rotary as one launch for q and
k) a layer runs 9 kernels. Each is an opaque op, so `torch.compile(fullgraph=True)` keeps it whole
inside a piece. The arithmetic follows HF transformers' bf16 rounding points (the residual sum is
rounded before it is normalized, the normalized row before the weight multiplies, SiLU's output before
the product), so logits match the reference as closely as the unfused ops did. The layers call these
on CUDA tensors only; on a CPU they run their torch reference, and CI runs the kernels in Triton's
interpreter against it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessera.graphs import opaque_op
from tessera.layers.kernel_launch import cdiv, next_pow2


@triton.jit
def _rms_norm_kernel(
    X, R, W, Out, RoutOut, stride_x, stride_r, stride_o, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(RoutOut.dtype.element_ty)  # rounded, as the unfused add would leave it
        tl.store(RoutOut + row * stride_o + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    # the normalized row is rounded to the model's dtype before the weight multiplies (as HF's is);
    # the product is taken in float32 and rounded once, which is what a bf16 multiply does
    normed = (x * tl.rsqrt(var + eps)).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=mask)


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    summed = torch.empty((rows, n), dtype=x.dtype, device=x.device) if residual is not None else out
    r = residual if residual is not None else x
    if rows == 0:
        return out, summed
    _rms_norm_kernel[(rows,)](
        x, r, weight, out, summed, x.stride(0), r.stride(0), out.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(n),
    )  # fmt: skip
    return out, summed


@opaque_op("tessera::rms_norm", fake=lambda x, weight, eps: x.new_empty(x.shape))
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x [T, N] (Triton)."""
    return _norm_launch(x, None, weight, eps)[0]


@opaque_op(
    "tessera::add_rms_norm",
    fake=lambda x, residual, weight, eps: (x.new_empty(x.shape), x.new_empty(x.shape)),
)
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) in one pass (Triton)."""
    return _norm_launch(x, residual, weight, eps)


@triton.jit
def _rotate_heads(
    X, Out, t, cos, sin, d, d_ok, stride_xt, stride_xh, stride_ot, stride_oh,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Rotate the HEADS heads of token t (rotate-half layout) from X into Out."""
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < HEADS) & d_ok[None, :]
    src = X + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = Out + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QOut, KOut, COS, SIN, POS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_c,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    cos = tl.load(COS + pos * stride_c + d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(SIN + pos * stride_c + d, mask=d_ok, other=0.0)[None, :]
    _rotate_heads(Q, QOut, t, cos, sin, d, d_ok, stride_qt, stride_qh, stride_qot, stride_qoh,
                  Q_HEADS, HALF, BLOCK_HQ)  # fmt: skip
    _rotate_heads(K, KOut, t, cos, sin, d, d_ok, stride_kt, stride_kh, stride_kot, stride_koh,
                  K_HEADS, HALF, BLOCK_HK)  # fmt: skip


@opaque_op(
    "tessera::rope",
    fake=lambda q, k, cos, sin, positions: (q.new_empty(q.shape), k.new_empty(k.shape)),
)
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (rotate-half layout) of q [T, H, D] and k [T, KVH, D]; cos, sin: [P, D/2]
    tables (a RotaryEmbedding's buffers, in the model's dtype once it is cast). One launch for q and
    k (a program a token: its cos/sin row is read once), no temporaries: q and k may be strided views
    of one QKV output."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, kv_heads, dim), dtype=k.dtype, device=k.device)
    if tokens:
        _rope_kernel[(tokens,)](
            q, k, q_out, k_out, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
            Q_HEADS=heads, K_HEADS=kv_heads, HALF=dim // 2, BLOCK_HQ=next_pow2(heads),
            BLOCK_HK=next_pow2(kv_heads), BLOCK_D=next_pow2(dim // 2),
        )  # fmt: skip
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(X, Out, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(Out.dtype.element_ty).to(tl.float32)  # rounded, as F.silu leaves it
    tl.store(Out + row * stride_o + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


@opaque_op("tessera::silu_mul", fake=lambda x: x.new_empty((x.shape[0], x.shape[1] // 2)))
def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for x = [gate | up] of shape [T, 2I] (Triton)."""
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = min(1024, next_pow2(n))
    if rows:
        _silu_mul_kernel[(rows, cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block)
    return out
