"""GGUF weights kept quantized: repack + torch reference against the `gguf` package, the Triton GEMMs
(TRITON_INTERPRET=1 on a CPU, compiled on a GPU) against dequantize-then-matmul, the op, padding rows,
the embedding and LM head in their blocks (tied, split over emulated TP ranks, compiled), and the
embedded SmolLM2 file read raw."""

from __future__ import annotations

import functools
import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.decorators import mark_unbacked

from tessera.distributed.state import as_rank
from tessera.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from tessera.quant.gguf import FORMATS, GGUFWeight, dequantize, gguf_linear, repack
from tessera.quant.methods import GGUFVocabMethod, gguf_blocks

from .conftest import needs_triton_on_cpu, rel_err

gguf = pytest.importorskip("gguf")
GGML = gguf.GGMLQuantizationType
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TYPES = sorted(FORMATS)
# Tolerances (relative Frobenius error vs float32 dequantize-then-matmul). The dequantized weights are
# bit-exact, so only the GEMM rounds: float32 x, float32 products summed in another order (~1e-7 here);
# bfloat16 x, the output rounded to bfloat16 (2^-9 per element, 2^-8 where the interpreter truncates) and,
# on the tensor-core path, W rounded to bfloat16 too: ~3e-3 measured, 1e-2 leaves room.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
if DEVICE == "cpu":
    on_device = needs_triton_on_cpu
else:
    on_device = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@functools.cache
def _raw(ggml_type: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, bytes per row]: the package's quantizer where it has one, else random valid blocks
    (any bits for values and 6-/8-bit scales, small positive fp16 super-block scales)."""
    rng = np.random.default_rng(seed)
    if ggml_type in ("Q8_0", "Q4_0", "Q4_1"):
        return gguf.quants.quantize(rng.standard_normal((n, k), dtype=np.float32), GGML[ggml_type])
    blocks = rng.integers(0, 256, (n, k // 256, FORMATS[ggml_type].block_bytes), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (n, k // 256, 2)).astype(np.float16).view(np.uint8)
    if ggml_type == "Q4_K":
        blocks[..., 0:4] = scales  # d, dmin
    else:
        blocks[..., 208:210] = scales[..., :2]  # Q6_K: d
    return blocks.reshape(n, -1)


def _weight(ggml_type: str, n: int, k: int, seed: int = 0) -> GGUFWeight:
    return repack(torch.from_numpy(_raw(ggml_type, n, k, seed).copy()), ggml_type, (n, k)).to(DEVICE)


def _reference(x: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
    return x.float() @ dequantize(w).T


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize(("n", "k"), [(1, 256), (7, 512), (33, 1536)])
def test_repack_and_dequantize_match_the_gguf_package(ggml_type: str, n: int, k: int) -> None:
    raw = _raw(ggml_type, n, k)
    w = repack(torch.from_numpy(raw.copy()), ggml_type, (n, k))
    want = torch.from_numpy(gguf.quants.dequantize(raw, GGML[ggml_type]).copy())
    got = dequantize(w)
    assert want.abs().max() > 0 and got.dtype == torch.float32
    assert torch.equal(got, want)  # bit-exact
    assert w.nbytes == raw.nbytes  # the same bits, rearranged
    assert all(p.is_contiguous() and p.shape[0] == n for p in w.parts)
    assert torch.equal(dequantize(w, torch.bfloat16), want.bfloat16())


def test_repack_rejects_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="no kernels"):
        repack(torch.zeros(2, 22, dtype=torch.uint8), "Q5_0", (2, 32))
    with pytest.raises(ValueError, match="multiple of 256"):
        GGUFWeight("Q4_K", (2, 128), _weight("Q4_K", 2, 256).parts)


@on_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 100])  # 1, 3: decode kernel; 16, 100: tiled
@pytest.mark.parametrize("ggml_type", TYPES)
def test_kernels_match_the_reference(ggml_type: str, m: int, dtype: torch.dtype) -> None:
    from tessera.quant.gguf_kernels import gguf_matmul

    n, k = (80, 512) if m % 2 else (48, 256)  # N not a multiple of the N tile (64)
    w = _weight(ggml_type, n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    y = gguf_matmul(x, w)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, _reference(x, w)) < TOL[dtype]


@on_device
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [2, 33])
def test_kernels_mask_a_partial_k_tile(ggml_type: str, m: int) -> None:
    """K = 160: five 32-blocks, so the last 128-wide K-tile is partial (SmolLM2's K = 576 is 4.5 tiles);
    the decode kernel both unsplit and split over K."""
    from tessera.quant.gguf_kernels import gguf_matmul

    w = _weight(ggml_type, 65, 160)
    x = torch.randn(m, 160, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = _reference(x, w)
    for split_k in (1, 2, None):
        assert rel_err(gguf_matmul(x, w, split_k=split_k), ref) < TOL[torch.float32]


def _poisoned(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    bad = x.clone()
    bad[rows[0]] = float("nan")
    bad[rows[1]] = torch.finfo(x.dtype).max  # huge: its products overflow to inf
    return bad


@on_device
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter overflows on the poison
@pytest.mark.parametrize("m", [3, 100])  # decode kernel (split over K), tiled kernel
@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q6_K"])
def test_poisoned_rows_leave_the_other_rows_bit_identical(ggml_type: str, m: int) -> None:
    from tessera.quant.gguf_kernels import gguf_matmul

    w = _weight(ggml_type, 96, 512)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.bfloat16)
    rows = [0, m - 1]
    clean, dirty = gguf_matmul(x, w), gguf_matmul(_poisoned(x, rows), w)
    keep = [r for r in range(m) if r not in rows]
    assert not dirty[rows[0]].isfinite().any()  # the poison did reach its own row
    assert torch.equal(dirty[keep], clean[keep])


def test_the_op_keeps_other_rows_bit_identical_on_cpu() -> None:
    w = _weight("Q4_1", 96, 512).to("cpu")
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(8))
    clean, dirty = gguf_linear(x, w), gguf_linear(_poisoned(x, [1, 4]), w)
    assert torch.equal(dirty[[0, 2, 3, 5]], clean[[0, 2, 3, 5]])


def test_gguf_linear_on_cpu_matches_the_reference_with_bias_and_leading_dims() -> None:
    w = _weight("Q4_K", 40, 256).to("cpu")
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(9)).bfloat16()
    bias = torch.randn(40).bfloat16()
    y = gguf_linear(x, w, bias)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert rel_err(y, _reference(x.view(6, 256), w).view(2, 3, 40) + bias.float()) < TOL[torch.bfloat16]


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q6_K"])
def test_opcheck(ggml_type: str) -> None:
    w = _weight(ggml_type, 24, 256).to("cpu")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(10))
    torch.library.opcheck(torch.ops.tessera.gguf_linear.default, (x, list(w.parts), ggml_type))


# ------------------------------------------------------------------ the embedding and the LM head

VOCAB, DIM = 101, 256  # 101 rows: TP 2 pads one row, TP 4 three (the last rank holds 23 real ones)


def _table(ggml_type: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A vocabulary table's file bytes uint8 [VOCAB, bytes per row] and its values, float32 [VOCAB, DIM]."""
    raw = torch.from_numpy(_raw(ggml_type, VOCAB, DIM, seed).copy())
    return raw, dequantize(repack(raw, ggml_type, (VOCAB, DIM)))


def _in_blocks(layer: VocabParallelEmbedding, raw: torch.Tensor) -> VocabParallelEmbedding:
    """`layer` loaded from the file's bytes and repacked, as a GGUF model load does."""
    assert isinstance(layer.method, GGUFVocabMethod)
    layer.weight_loader(layer.weight, gguf_blocks(raw, layer.method.ggml_type))
    layer.process_weights_after_loading()
    return layer


def _dense(layer: VocabParallelEmbedding, table: torch.Tensor) -> VocabParallelEmbedding:
    layer.weight_loader(layer.weight, table)
    return layer


def _own_tensors(layer: nn.Module) -> list[torch.Tensor]:
    return [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K", "Q6_K"])
def test_embedding_and_head_in_blocks_equal_the_dequantized_table(ggml_type: str, dtype: torch.dtype) -> None:
    raw, table = _table(ggml_type)
    embed = _in_blocks(
        VocabParallelEmbedding(VOCAB, DIM, dtype=dtype, method=GGUFVocabMethod(ggml_type)), raw
    )
    head = _in_blocks(ParallelLMHead(VOCAB, DIM, dtype=dtype, method=GGUFVocabMethod(ggml_type)), raw)
    tied = ParallelLMHead(VOCAB, DIM, dtype=dtype)  # built plain, as a head absent from the file is
    tied.tie_weights(embed)
    assert sum(t.nbytes for t in _own_tensors(embed)) == raw.nbytes and not hasattr(embed, "weight")
    assert not _own_tensors(tied) and tied.tied_to == (embed,)  # the embedding's blocks, no second copy
    ids = torch.tensor([0, 7, 50, 7, VOCAB - 1])
    got = embed(ids)  # only these rows' blocks dequantized: bit for bit the dequantized table's rows
    assert got.dtype == dtype and torch.equal(got, F.embedding(ids, table).to(dtype))
    assert embed(ids[:0]).shape == (0, DIM)  # an empty lookup
    x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    for layer in (head, tied):
        logits = layer(x)
        assert logits.shape == (3, VOCAB) and logits.dtype == dtype
        assert rel_err(logits, x.float() @ table.T) < TOL[dtype]
        assert torch.equal(layer.dequantize(), table)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K"])
def test_blocks_split_over_ranks_as_the_dense_rows(ggml_type: str, world: int) -> None:
    """Each emulated rank (no process group: its collectives pass its own part through) gives what the
    dense layer of that rank gives: zero rows for the ids of other ranks, zero padding rows, its columns
    of the logits; the ranks' parts sum and join to the whole table's."""
    raw, table = _table(ggml_type, seed=1)
    ids = torch.tensor([0, 25, 26, 50, 51, 77, 78, VOCAB - 1])
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(2))
    rows, columns = [], []
    for rank in range(world):
        with as_rank(rank, world):
            embed = _in_blocks(VocabParallelEmbedding(VOCAB, DIM, method=GGUFVocabMethod(ggml_type)), raw)
            dense = _dense(VocabParallelEmbedding(VOCAB, DIM), table)
            head, dense_head = ParallelLMHead(VOCAB, DIM), ParallelLMHead(VOCAB, DIM)
        head.tie_weights(embed)
        dense_head.tie_weights(dense)
        got = embed(ids)
        assert torch.equal(got, dense(ids))
        mine = (ids >= embed.vocab_start) & (ids < embed.vocab_start + embed.rows_per_rank)
        assert got[~mine].eq(0).all() and got[mine].ne(0).any()
        assert embed.dequantize()[embed.num_real_rows :].eq(0).all()  # padding: zero bytes, zero values
        logits = head(x)  # [T, V_r]
        assert logits.shape == (4, embed.rows_per_rank) and rel_err(logits, dense_head(x)) < 1e-6
        rows.append(got)
        columns.append(logits)
    assert torch.equal(sum(rows), F.embedding(ids, table))
    joined = torch.cat(columns, dim=-1)
    assert joined[:, VOCAB:].eq(0).all()  # the padding rows' logits, cut by the gather
    assert rel_err(joined[:, :VOCAB], x @ table.T) < 1e-6


def test_blocks_of_a_dim_the_format_cannot_split_fail_at_build() -> None:
    with pytest.raises(ValueError, match="embedding dim 96 is not a multiple of the format's 256"):
        VocabParallelEmbedding(VOCAB, 96, method=GGUFVocabMethod("Q4_K"))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # Inductor's
@pytest.mark.parametrize(("ggml_type", "compiler"), [("Q8_0", None), ("Q6_K", None), ("Q4_K", "inductor")])
def test_tied_tables_in_blocks_compile_with_the_opaque_head(ggml_type: str, compiler: str | None) -> None:
    """fullgraph=True (a graph break raises) over an unbacked token count, as the compile strategy's
    pieces: the lookup traces as torch ops, the head stays one opaque `tessera::gguf_linear`, and the
    compiled forward equals eager at two sizes of the one graph (Inductor's too)."""
    raw, _ = _table(ggml_type)
    embed = _in_blocks(VocabParallelEmbedding(VOCAB, DIM, method=GGUFVocabMethod(ggml_type)), raw)
    head = ParallelLMHead(VOCAB, DIM)
    head.tie_weights(embed)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        graphs.append(gm)
        if compiler is None:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    model = nn.Sequential(embed, head)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for n in (9, 3):
        ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
        mark_unbacked(ids, 0)
        assert torch.equal(compiled(ids), model(ids))
    assert len(graphs) == 1
    calls = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert calls.count(torch.ops.tessera.gguf_linear) == 1  # (Dynamo records the overload packet)


def _model_path():
    from tessera.loader.model_loader import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_raw_tensors_of_the_embedded_model() -> None:
    from tessera.loader.gguf_file import GGUFFile

    f = GGUFFile(_model_path())
    wanted = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"}  # fmt: skip
    types, quant, total, bf16, q4_1, q4_1_bf16, raw_of = Counter(), 0, 0, 0, 0, 0, {}
    for name, kind, raw, (rows, cols) in f.raw_tensors():
        types[kind] += 1
        assert raw.dtype == torch.uint8 and raw.shape[0] == rows
        nbytes = raw.numel()
        if kind in FORMATS:
            w = repack(raw, kind, (rows, cols))
            assert w.nbytes == nbytes
            quant += 1
            nbytes = w.nbytes
            if kind == "Q4_1":
                q4_1, q4_1_bf16 = q4_1 + nbytes, q4_1_bf16 + rows * cols * 2
            if name in wanted:
                raw_of[name] = w
        total, bf16 = total + nbytes, bf16 + rows * cols * 2
    print(f"embedded model: tensor types {dict(types)}; {total / bf16:.4f}x of bf16 in all")
    assert quant > 200 and raw_of.keys() == wanted
    # NOTE: Q4_1 is 5 bits a weight (0.3125x of bf16); the whole file is ~0.359x, because its tied
    # embedding (21% of the weights) is Q8_0 at 8.5 bits: the repack keeps the bits exactly.
    assert q4_1 <= 0.35 * q4_1_bf16
    assert total <= 0.36 * bf16
    for name, tensor in f.weights():  # embed_tokens and layer 0 come first: stop once all are seen
        if name in raw_of:
            assert torch.equal(dequantize(raw_of.pop(name)), tensor), name  # q, k: un-permuted alike
        if not raw_of:
            break
    assert not raw_of


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), [(576, 1536), (4096, 4096)])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_kernels_at_real_sizes(ggml_type: str, n: int, k: int, dtype: torch.dtype) -> None:
    from tessera.quant.gguf_kernels import SMALL_M, gguf_matmul

    w = _weight(ggml_type, n, k)
    ref_w = dequantize(w)
    for m in (1, SMALL_M, 64, 512, 2048):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
        got = gguf_matmul(x, w)
        assert rel_err(got, x.float() @ ref_w.T) < TOL[dtype], (m, rel_err(got, x.float() @ ref_w.T))
