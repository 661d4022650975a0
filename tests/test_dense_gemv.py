"""The dense decode GEMM (`tessera.layers.gemv`: bf16 / fp16 weights, M <= 16 rows) against
float64, its op, and the dense layers' dispatch to it: only where the card's tuned table has the
weight's shape (on a CPU, never, unless a test says so). Triton runs in its interpreter here
(TRITON_INTERPRET=1, set by conftest without a GPU); the tolerances are those of tests/test_quant_gemv.py
(the weights are exact in their dtype, sums in float32)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tessera.layers import linear

from .conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gemv = linear.gemv
pytestmark = pytest.mark.skipif(
    gemv is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton, and on a CPU its interpreter (TRITON_INTERPRET=1)",
)
TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3}


def _case(m: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_gemv_matches_float64(dtype: torch.dtype, m: int) -> None:
    """N = 72, K = 200: partial N and K tiles; the default config and a split along K (3 splits, the
    last short), with and without bias."""
    x, w, b = _case(m, 72, 200, dtype, seed=m)
    want = x.double() @ w.double().T
    split = gemv.GemvConfig(block_n=32, block_k=64, split_k=3, num_warps=4, num_stages=2)
    for cfg in (None, split):
        got = gemv.dense_gemv(x, w, config=cfg)
        assert got.dtype == dtype and rel_err(got, want) < TOL[dtype], cfg
        with_bias = gemv.dense_gemv(x, w, b, config=cfg)
        assert rel_err(with_bias, want + b.double()) < TOL[dtype], cfg


def test_dense_gemv_checks_its_inputs() -> None:
    x, w, _ = _case(2, 32, 64, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="M <= 16"):
        gemv.dense_gemv(torch.cat([x] * 9), w)
    with pytest.raises(ValueError, match="dense decode GEMM"):
        gemv.dense_gemv(x, w.half())
    with pytest.raises(ValueError, match="dense decode GEMM"):  # tl.dot would round float32 to TF32
        gemv.dense_gemv(x.float(), w.float())


def test_dense_linear_op_is_f_linear_past_the_decode_rows() -> None:
    x, w, b = _case(20, 48, 64, torch.bfloat16, seed=3)
    torch.testing.assert_close(gemv.dense_linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    small = gemv.dense_linear(x[:3], w, b)
    assert rel_err(small, x[:3].double() @ w.double().T + b.double()) < TOL[torch.bfloat16]
    batched = gemv.dense_linear(x[:4].view(2, 2, 64), w, b)  # leading dims: rows, as F.linear's
    assert batched.shape == (2, 2, 48) and torch.equal(batched.view(4, 48), gemv.dense_linear(x[:4], w, b))
    torch.library.opcheck(torch.ops.tessera.dense_linear.default, (x[:3], w, b))


def test_dense_layers_take_the_gemv_only_where_the_card_is_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = linear.ReplicatedLinear(64, 48, bias=False, dtype=torch.bfloat16).to(DEVICE)
    torch.nn.init.normal_(layer.weight, std=0.05)
    x = torch.randn(2, 64, device=DEVICE, dtype=torch.bfloat16)
    calls: list[int] = []
    monkeypatch.setattr(gemv, "dense_gemv", lambda *a, **kw: calls.append(1) or F.linear(*a))
    layer.process_weights_after_loading()
    assert DEVICE == "cuda" or not layer.decode_gemv  # no table on a CPU (nor, here, on a GPU)
    layer(x)
    assert calls == [] or layer.decode_gemv
    monkeypatch.setattr(gemv, "tuned_for", lambda weight: True)
    layer.process_weights_after_loading()
    calls.clear()
    layer(x)
    assert layer.decode_gemv and calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 14336)])
def test_gpu_dense_gemv_on_llama_shapes_replays_bit_identical(n: int, k: int) -> None:
    x, w, _ = _case(gemv.MAX_ROWS, n, k, torch.bfloat16, seed=n)
    for m in (1, 8, gemv.MAX_ROWS):
        out = gemv.dense_linear(x[:m], w, None)
        assert rel_err(out, x[:m].double() @ w.double().T) < TOL[torch.bfloat16]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = gemv.dense_linear(x[:m], w, None)
        graph.replay()
        assert torch.equal(replayed, out)
