"""tessera.distributed and the parallel layers: CPU ranks over gloo (spawned by `launch`), each layer
at TP 2 (and 4) against the unsharded reference, collectives under padding and torch.compile, the
ShardSpec slicing quantized formats rely on, rank failures, and TP 1 equal to nn.Linear bit for bit."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tessera.distributed import (
    ParallelConfig,
    WorkerError,
    all_gather,
    all_reduce,
    destroy,
    ep_rank,
    ep_size,
    init_distributed,
    launch,
    set_all_reduce_placement,
    tp_group,
    tp_rank,
    tp_size,
)
from tessera.distributed import state as dist_state
from tessera.distributed.state import as_rank
from tessera.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tessera.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from tests.conftest import rel_err
from tests.distributed_workers import (
    PackedLinearMethod,
    Pairs,
    load_full,
    packed_tensors,
    tp4_checks,
    tp_checks,
)


@pytest.fixture(scope="module")
def tp2() -> list[Pairs]:
    return launch(tp_checks, 2, backend="gloo", timeout_s=120)


def _assert_close(results: list[Pairs], names: list[str]) -> None:
    for rank, pairs in enumerate(results):
        for name in names:
            out, ref = pairs[name]
            assert out.shape == ref.shape, (rank, name)
            assert rel_err(out, ref) < 1e-5, (rank, name, rel_err(out, ref))


def test_parallel_linears_at_tp2_match_the_unsharded_layer(tp2: list[Pairs]) -> None:
    names = ["column_gathered", "column_local", "replicated", "merged", "row", "mlp"]
    _assert_close(tp2, names + [f"qkv_4_{kv}_{p}" for kv in (2, 1) for p in "qkv"])
    assert not torch.equal(tp2[0]["column_local"][0], tp2[1]["column_local"][0])  # really different slices


def test_vocab_parallel_embedding_and_head_at_tp2(tp2: list[Pairs]) -> None:
    _assert_close(tp2, ["embedding", "lm_head", "lm_head_tied"])  # vocab 101: rank 1 holds a padding row


def test_vocab_parallel_tables_in_gguf_blocks_at_tp2(tp2: list[Pairs]) -> None:
    _assert_close(tp2, ["gguf_embedding", "gguf_lm_head", "gguf_lm_head_tied"])
    for pairs in tp2:
        assert torch.equal(*pairs["gguf_embedding"])  # the looked-up rows dequantized: bit for bit


def test_all_reduce_inside_and_split_sum_and_zero_padded_rows(tp2: list[Pairs]) -> None:
    names = ["all_reduce_inside", "all_reduce_split", "all_gather_last", "all_gather_rows"]
    _assert_close(tp2, [*names, "all_reduce_inside_padded", "all_reduce_split_padded"])
    for pairs in tp2:
        for placement in ("inside", "split"):
            out = pairs[f"all_reduce_{placement}_padded"][0]
            assert out[4:].eq(0).all() and out[:4].isfinite().all()  # NaN padding never reached a sum
        assert torch.equal(*pairs["input_untouched"])  # out of place


def test_collectives_trace_with_fullgraph_compile(tp2: list[Pairs]) -> None:
    _assert_close(tp2, ["compiled_inside", "compiled_split"])  # fullgraph=True: a graph break raises


def test_packed_format_loads_its_slices_and_computes_at_tp2(tp2: list[Pairs]) -> None:
    _assert_close(tp2, ["packed_merged", "packed_row"])
    gate, up, down = packed_tensors(64, 64, 1, 4), packed_tensors(64, 64, 1, 5), packed_tensors(48, 128, 1, 6)
    for rank in range(2):
        with as_rank(rank, 2):
            merged = MergedColumnParallelLinear(64, [64, 64], method=PackedLinearMethod())
            row = RowParallelLinear(128, 48, bias=False, method=PackedLinearMethod())
        load_full(merged, gate, 0)
        load_full(merged, up, 1)
        load_full(row, down)
        rows = slice(32 * rank, 32 * (rank + 1))  # 32 of 64 outputs: 32 rows of bytes, 1 of scales
        assert torch.equal(merged.qweight, torch.cat([gate["qweight"][rows], up["qweight"][rows]]))
        scales = [t["block_scale"][rank : rank + 1] for t in (gate, up)]
        assert torch.equal(merged.block_scale, torch.cat(scales))
        assert torch.equal(merged.tensor_scale, torch.cat([gate["tensor_scale"], up["tensor_scale"]]))
        # 64 of 128 inputs: 32 columns of bytes (2 inputs each), 2 of the 32-wide scale blocks
        assert torch.equal(row.qweight, down["qweight"][:, 32 * rank : 32 * (rank + 1)])
        assert torch.equal(row.block_scale, down["block_scale"][:, 2 * rank : 2 * (rank + 1)])
        assert merged.missing_shards() == [] and row.missing_shards() == []


def test_tp4_replicated_kv_heads_and_short_vocab_slice() -> None:
    results = launch(tp4_checks, 4, backend="gloo", timeout_s=120)
    names = ["embedding", "lm_head", "lm_head_tied", "row", "mlp", "merged", "column_gathered"]
    names += ["gguf_embedding", "gguf_lm_head", "gguf_lm_head_tied"]  # the last rank: 3 padding rows
    _assert_close(results, names + [f"qkv_8_2_{p}" for p in "qkv"])
    k = [r["qkv_8_2_k"][0] for r in results]
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and not torch.equal(k[1], k[2])


@pytest.mark.parametrize(("how", "says"), [("raise", "ValueError: boom on rank 1"), ("kill", "SIGKILL")])
def test_a_failing_rank_is_named_quickly(how: str, says: str) -> None:
    from tests.distributed_workers import fail_on

    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1") as err:
        launch(fail_on, 2, 1, how, backend="gloo", timeout_s=60)
    assert err.value.rank == 1 and says in str(err.value)
    assert time.monotonic() - start < 20  # spawn start-up included; the others' barrier never returns


def test_tp1_layers_equal_nn_linear_bit_for_bit() -> None:
    assert init_distributed(0, 1) == ParallelConfig(tp=1)
    assert not dist.is_initialized() and tp_size() == 1 and tp_group() is None
    torch.manual_seed(0)
    x, ref = torch.randn(5, 16), nn.Linear(16, 24)
    for cls in (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear):
        layer = cls(16, 24)
        load_full(layer, {"weight": ref.weight, "bias": ref.bias})
        assert torch.equal(layer(x), ref(x)), cls.__name__
    fused = nn.Linear(16, 48, bias=False)
    merged = MergedColumnParallelLinear(16, [24, 24])
    load_full(merged, {"weight": fused.weight[:24]}, 0)
    load_full(merged, {"weight": fused.weight[24:]}, 1)
    assert torch.equal(merged(x), fused(x))
    qkv = QKVParallelLinear(16, 4, num_heads=4, num_kv_heads=2)  # 16 + 8 + 8 = 32 outputs
    load_full(qkv, {"weight": fused.weight[:32]})  # an already fused checkpoint tensor: shard_id None
    assert torch.equal(qkv(x), F.linear(x, fused.weight[:32])) and qkv.missing_shards() == []
    table, ids = torch.randn(101, 16), torch.tensor([0, 50, 100])
    embed, head = VocabParallelEmbedding(101, 16), ParallelLMHead(101, 16)
    embed.weight_loader(embed.weight, table)
    head.tie_weights(embed)
    assert torch.equal(embed(ids), nn.functional.embedding(ids, table))
    assert torch.equal(head(x), F.linear(x, table))
    assert all_reduce(x) is x and all_gather(x) is x  # no op, no group


def test_loading_errors_and_missing_shards() -> None:
    with as_rank(1, 2):
        merged = MergedColumnParallelLinear(16, [32, 32])
        qkv = QKVParallelLinear(16, 4, num_heads=4, num_kv_heads=1)
        packed = RowParallelLinear(64, 16, method=PackedLinearMethod())
    merged.weight_loader(merged.weight, torch.randn(32, 16), 0)
    assert merged.missing_shards() == ["weight#1"]
    with pytest.raises(ValueError, match=r"slice of the checkpoint tensor is \(16, 15\)"):
        merged.weight_loader(merged.weight, torch.randn(32, 15), 1)
    with pytest.raises(ValueError, match="unknown shard 2"):
        merged.weight_loader(merged.weight, torch.randn(32, 16), 2)
    with pytest.raises(ValueError, match="needs 32 elements along dim 0, the tensor has 16"):
        merged.weight_loader(merged.weight, torch.randn(16, 16), 1)
    assert qkv.num_heads == 2 and qkv.num_kv_heads == 1 and qkv.num_kv_head_replicas == 2
    assert qkv.missing_shards() == ["weight#q", "weight#k", "weight#v"]
    with pytest.raises(ValueError, match="one scalar per fused part"):
        packed.weight_loader(packed.tensor_scale, torch.ones(2))
    with pytest.raises(ValueError, match="no parameter of this"):
        packed.weight_loader(merged.weight, torch.randn(32, 16))


def test_packed_block_must_not_straddle_ranks() -> None:
    with as_rank(1, 2):  # rank 1's 24 input rows start at 24: inside a 32-wide scale block
        row = RowParallelLinear(48, 16, method=PackedLinearMethod())
    with pytest.raises(ValueError, match="offset 24 along dim 1 is not a multiple of its packing 32"):
        row.weight_loader(row.block_scale, torch.ones(1, 2))


class _Forgetful(LinearMethod):
    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        layer.register_parameter("weight", nn.Parameter(torch.empty(out_features, in_features)))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="tp must be >= 1"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="ep must be 1 or equal to tp=4"):
        ParallelConfig(tp=4, ep=2)
    assert ParallelConfig(tp=4, ep=4).world_size == 4
    with pytest.raises(TypeError, match="no ShardSpec"):
        ReplicatedLinear(4, 4, method=_Forgetful())
    with pytest.raises(ValueError, match="placement"):
        set_all_reduce_placement("outside")  # type: ignore[arg-type]
    with as_rank(0, 4):
        with pytest.raises(ValueError, match="num_heads=6 is not divisible by the TP size 4"):
            QKVParallelLinear(16, 4, num_heads=6, num_kv_heads=2)
        with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
            QKVParallelLinear(16, 4, num_heads=12, num_kv_heads=3)
        previous = set_all_reduce_placement("split")
        try:
            assert RowParallelLinear(16, 8).placement == "split"  # read when the layer is built
        finally:
            set_all_reduce_placement(previous)


def test_single_rank_from_torchrun_env_needs_no_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() == ParallelConfig(tp=1)  # no MASTER_ADDR needed: nothing to rendezvous
    assert not dist.is_initialized() and ep_size() == 1 and ep_rank() == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="rank 3 is outside"):
        init_distributed(rank=3)
    previous = dist_state._state
    dist_state._state = dist_state._State(ParallelConfig(tp=2, ep=2), 1, None)
    try:
        assert (tp_rank(), ep_rank(), ep_size()) == (1, 1, 2)
    finally:
        dist_state._state = previous
    destroy()
    assert tp_size() == 1


def test_a_pre_fused_checkpoint_tensor_loads_as_its_parts() -> None:
    torch.manual_seed(3)
    wq, wk, wv = torch.randn(16, 8), torch.randn(4, 8), torch.randn(4, 8)
    with as_rank(1, 2):  # 4 query heads of 4, 1 KV head: rank 1 holds query heads 2-3 and the KV head
        parts, fused = (QKVParallelLinear(8, 4, num_heads=4, num_kv_heads=1) for _ in range(2))
    for shard, w in zip("qkv", (wq, wk, wv), strict=True):
        parts.weight_loader(parts.weight, w, shard)
    fused.weight_loader(fused.weight, torch.cat([wq, wk, wv]))
    assert torch.equal(fused.weight, parts.weight) and fused.missing_shards() == []
    assert torch.equal(parts.weight, torch.cat([wq[8:], wk, wv]))
