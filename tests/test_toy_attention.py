"""The toy transformer's Triton attention kernel against torch's (TRITON_INTERPRET=1 on CPU): causal
attention on the real rows, zeros on the padded ones, whatever the padded inputs and output held."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .conftest import rel_err

toy_attention = pytest.importorskip("tessera.testing.toy_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = 1e-5 if DEVICE == "cpu" else 2e-3  # float32: exact in the interpreter, TF32 dots on a GPU


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    o = F.scaled_dot_product_attention(
        q.double().transpose(0, 1), k.double().transpose(0, 1), v.double().transpose(0, 1), is_causal=True
    )
    return o.transpose(0, 1)


@pytest.mark.parametrize(("n", "size", "heads", "head_dim"), [(5, 8, 2, 16), (70, 96, 3, 64), (1, 4, 9, 64),
                                                              (33, 33, 2, 48), (0, 16, 2, 16)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_real_rows_match_torch_and_padded_rows_are_zero(
    n: int, size: int, heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(n * 131 + size)
    # q, k, v as the toy takes them: strided views of one fused projection [T, 3, H, D]
    qkv = torch.randn(size, 3, heads, head_dim, generator=g).to(DEVICE, dtype)
    qkv[n:] = float("nan")  # padded rows: garbage the kernel must never read
    out = torch.full((size, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    toy_attention.causal_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], out, n)
    assert out[n:].eq(0).all()
    if n:
        want = _reference(qkv[:n, 0], qkv[:n, 1], qkv[:n, 2])
        assert rel_err(out[:n].double(), want) < (EXACT if dtype == torch.float32 else 2e-3)


def test_non_contiguous_heads_are_refused() -> None:
    x = torch.randn(4, 16, 2, device=DEVICE).transpose(1, 2)  # [4, 2, 16], head values strided
    with pytest.raises(ValueError, match="contiguous"):
        toy_attention.causal_attention(x, x, x, torch.empty(4, 2, 16, device=DEVICE), 4)


def test_one_binding_serves_every_number_of_real_rows() -> None:
    """A graph replays the op bound once to its buffers: each call's `n` decides the real rows."""
    qkv = torch.empty(24, 3, 2, 16, device=DEVICE)
    out = torch.empty(24, 2, 16, device=DEVICE)
    attend = toy_attention.CausalAttention(qkv[:, 0], qkv[:, 1], qkv[:, 2], out)
    g = torch.Generator().manual_seed(3)
    for n in (24, 7, 1, 16):
        qkv.copy_(torch.randn(qkv.shape, generator=g))
        qkv[n:] = float("nan")
        out.fill_(float("nan"))
        attend(n)
        assert out[n:].eq(0).all()
        assert rel_err(out[:n], _reference(qkv[:n, 0], qkv[:n, 1], qkv[:n, 2])) < EXACT
