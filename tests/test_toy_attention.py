"""The toy transformer's Triton attention kernel against torch's (TRITON_INTERPRET=1 on CPU): causal
attention on the real rows, zeros on the padded ones, whatever the padded inputs and output held."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .conftest import rel_err

toy_attention = pytest.importorskip("tessera.graphs.toy_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
        assert rel_err(out[:n].double(), want) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_non_contiguous_heads_are_refused() -> None:
    x = torch.randn(4, 16, 2, device=DEVICE).transpose(1, 2)  # [4, 2, 16], head values strided
    with pytest.raises(ValueError, match="contiguous"):
        toy_attention.causal_attention(x, x, x, torch.empty(4, 2, 16, device=DEVICE), 4)
