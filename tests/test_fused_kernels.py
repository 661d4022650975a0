"""The fused Triton kernels (add + RMSNorm, rotary, SiLU·mul) against the torch reference the layers run
on a CPU (TRITON_INTERPRET=1 here; on a GPU the same tests run the compiled kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.layers.norm import RMSNorm
from tessera.layers.rotary import RotaryEmbedding, _rotate

fused = pytest.importorskip("tessera.layers.fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16: a few rounding points, each up to 1 ulp (2^-8) where the interpreter truncates
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 576])  # 576: not a power of two (SmolLM2's hidden size)
def test_add_rms_norm_matches_the_reference(dtype: torch.dtype, width: int) -> None:
    norm = RMSNorm(width, 1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(_rand(width, dtype=torch.float32, seed=1) * 0.1 + 1)
    norm = norm.to(dtype)
    x, residual = _rand(7, width, dtype=dtype, seed=2), _rand(7, width, dtype=dtype, seed=3)
    ref_normed, ref_sum = norm._reference(x + residual), x + residual
    normed, summed = fused.add_rms_norm(x, residual, norm.weight, norm.eps)
    if dtype == torch.float32 or DEVICE == "cuda":  # the residual stream rounds as an unfused add does
        assert torch.equal(summed, ref_sum)
    else:  # Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest
        assert torch.allclose(summed.float(), ref_sum.float(), rtol=8e-3, atol=0)
    assert torch.allclose(normed.float(), ref_normed.float(), rtol=TOL[dtype], atol=TOL[dtype])
    alone = fused.rms_norm(x, norm.weight, norm.eps)
    assert torch.allclose(alone.float(), norm._reference(x).float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_norm_takes_strided_rows_and_empty_batches() -> None:
    wide = _rand(5, 128, dtype=torch.float32, seed=4)
    x, weight = wide[:, :64], torch.ones(64, device=DEVICE)  # row stride 128
    assert torch.allclose(
        fused.rms_norm(x, weight, 1e-6), RMSNorm(64, 1e-6).to(DEVICE)._reference(x), atol=1e-5
    )
    assert fused.rms_norm(wide[:0, :64], weight, 1e-6).shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_the_reference_on_strided_q_and_k(dtype: torch.dtype) -> None:
    heads, kv_heads, dim, tokens = 9, 3, 64, 11  # SmolLM2's heads: not powers of two
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # fmt: skip
    rotary = RotaryEmbedding(dim, 10000.0, 128, scaling).to(DEVICE)
    qkv = _rand(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=5)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)  # strided views of one projection, as in the model
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    positions = torch.tensor([0, 1, 2, 5, 9, 33, 64, 100, 127, 3, 0], device=DEVICE)
    got_q, got_k = fused.rope(q, k, rotary.cos, rotary.sin, positions)
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    for got, ref in ((got_q, _rotate(q, cos, sin)), (got_k, _rotate(k, cos, sin))):
        assert got.is_contiguous()
        assert torch.allclose(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_the_reference(dtype: torch.dtype) -> None:
    inter = 1536  # more than one column block, and not a power of two
    x = _rand(6, 2 * inter, dtype=dtype, seed=6)
    gate, up = x.chunk(2, dim=-1)
    got = fused.silu_mul(x)
    assert got.shape == (6, inter)
    assert torch.allclose(got.float(), (F.silu(gate) * up).float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize(("n", "pow2"), [(0, 1), (1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (576, 1024)])
def test_launch_arithmetic_matches_triton(n: int, pow2: int) -> None:
    import triton

    from tessera.layers.kernel_launch import cdiv, next_pow2

    assert next_pow2(n) == pow2 == (triton.next_power_of_2(n) if n else 1)
    assert cdiv(n, 16) == triton.cdiv(n, 16)
