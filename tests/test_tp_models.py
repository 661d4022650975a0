"""Every model family on the tensor/expert-parallel layers, on CPU ranks over gloo: logits at TP 2 (and
EP 2 for the MoE families, TP 4 for every family) equal one rank's, from the same seeded
dummy weights or a safetensors checkpoint read slice by slice; emulated piecewise graphs on each rank
equal eager; a rank reads only its slices; missing tensors are named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.distributed import launch
from tessera.distributed.state import as_rank
from tessera.loader import hf
from tessera.loader.lazy import LazySlice
from tessera.loader.model_loader import build_model, dummy_weights
from tests.conftest import rel_err
from tests.tp_model_workers import CONFIGS, MOE, build, family_logits, four_rank_logits, logits, write_folder

STATS = "llama/graph_stats"


def _fused_expert_checkpoint(source: Path, folder: Path) -> None:
    """`source`'s dummy weights as a safetensors file, experts in HF's fused 3-D tensors."""
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    cfg = hf.read_config(source)
    tensors = {name: t.materialize() for name, t in dummy_weights(cfg, torch.device("cpu"))}
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        experts = range(cfg.moe.num_experts)  # type: ignore[union-attr]
        parts = {
            k: [tensors.pop(f"{prefix}.{e}.{k}_proj.weight") for e in experts] for k in ("gate", "up", "down")
        }
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat(gu) for gu in zip(parts["gate"], parts["up"], strict=True)]
        )
        tensors[f"{prefix}.down_proj"] = torch.stack(parts["down"])
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp_models")
    return {family: str(write_folder(root, family)) for family in CONFIGS}


@pytest.fixture(scope="module")
def checkpoint(folders: dict[str, str]) -> str:
    folder = Path(folders["qwen3-moe"]).parent / "qwen3-moe-safetensors"
    _fused_expert_checkpoint(Path(folders["qwen3-moe"]), folder)
    return str(folder)


@pytest.fixture(scope="module")
def one_rank(folders: dict[str, str], checkpoint: str) -> dict[str, Any]:
    return family_logits(0, 1, folders, checkpoint)


@pytest.fixture(scope="module")
def two_ranks(folders: dict[str, str], checkpoint: str) -> list[dict[str, Any]]:
    return launch(family_logits, 2, folders, checkpoint, backend="gloo", timeout_s=120)


NAMES = [*CONFIGS, *(f"{f}/ep" for f in MOE), "checkpoint", "checkpoint/ep", "qwen3-moe/mxfp4/ep"]


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_give_one_ranks_logits(name: str, one_rank: dict[str, Any], two_ranks: list[Any]) -> None:
    ref = one_rank[name]
    assert ref.shape == (4, 250) and ref.abs().sum() > 0
    for rank, out in enumerate(two_ranks):
        assert rel_err(out[name], ref) < 1e-4, (rank, name, rel_err(out[name], ref))


def test_one_rank_ep_and_checkpoint_are_the_dummy_model(one_rank: dict[str, Any]) -> None:
    for family in MOE:  # with one rank "EP" holds every expert: the same model
        assert torch.equal(one_rank[f"{family}/ep"], one_rank[family])
    assert rel_err(one_rank["qwen3-moe/mxfp4/ep"], one_rank["qwen3-moe"]) > 1e-3  # quantized, and it shows
    assert torch.equal(one_rank["checkpoint"], one_rank["qwen3-moe"])  # the same tensors, read back


def test_emulated_piecewise_graphs_on_each_rank_equal_eager(two_ranks: list[dict[str, Any]]) -> None:
    for out in two_ranks:
        assert rel_err(out["llama/graphs"], out["llama"]) < 1e-5
        assert out[STATS]["replays"] == {"piecewise": {"16": 1, "8": 1}}  # prefill 12 -> 16, decode 2 -> 8


def test_four_ranks_give_one_ranks_logits(folders: dict[str, str], one_rank: dict[str, Any]) -> None:
    outs = launch(four_rank_logits, 4, folders, backend="gloo", timeout_s=120)
    for rank, out in enumerate(outs):
        for family in CONFIGS:
            assert rel_err(out[family], one_rank[family]) < 1e-4, (rank, family)


def _recording(
    weights: Iterator[tuple[str, LazySlice]], read: dict[str, int]
) -> Iterator[tuple[str, LazySlice]]:
    for name, t in weights:
        yield name, LazySlice(lambda box, t=t, name=name: _count(t.read(box), name, read), t.box, name)


def _count(tensor: torch.Tensor, name: str, read: dict[str, int]) -> torch.Tensor:
    read[name] = read.get(name, 0) + tensor.numel()
    return tensor


def test_a_rank_reads_only_its_slices(folders: dict[str, str]) -> None:
    cfg = hf.read_config(folders["qwen3-moe"])
    read: dict[str, int] = {}
    with as_rank(1, 2, ep=2):
        model = build_model(cfg, torch.float32, "cpu")
    model.load_weights(_recording(dummy_weights(cfg, torch.device("cpu")), read))
    assert model.local_kv_heads == 1
    experts = [n for n in read if ".experts." in n]
    assert experts and all(int(n.split(".experts.")[1].split(".")[0]) >= 4 for n in experts)  # 4-7 only
    attn = "model.layers.0.self_attn"
    assert read[f"{attn}.q_proj.weight"] == 64 * 64 // 2 and read[f"{attn}.k_proj.weight"] == 16 * 64
    assert read[f"{attn}.o_proj.weight"] == 64 * 64 // 2 and read["model.embed_tokens.weight"] == 125 * 64
    assert read["model.layers.0.mlp.gate.weight"] == 8 * 64  # the router: whole


def test_missing_and_unknown_tensors_are_named(folders: dict[str, str]) -> None:
    cfg = hf.read_config(folders["deepseek-v2"])
    with as_rank(0, 2, ep=2):
        model = build_model(cfg, torch.float32, "cpu")
    dropped = {"model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.mlp.experts.1.up_proj.weight"}
    weights = [(n, t) for n, t in dummy_weights(cfg, torch.device("cpu")) if n not in dropped]
    with pytest.raises(KeyError, match="misses 2 tensors") as err:
        model.load_weights(weights)
    assert "model.layers.1.self_attn.kv_b_proj.weight" in str(err.value)
    assert "model.layers.2.mlp.experts.gate_up_proj" in str(err.value)
    with as_rank(1, 2, ep=2):  # expert 1 lives on rank 0: rank 1 never needs it
        build_model(cfg, torch.float32, "cpu").load_weights(
            (n, t) for n, t in dummy_weights(cfg, torch.device("cpu")) if n != max(dropped)
        )
    with pytest.raises(KeyError, match="mystery"):
        model.load_weights([("model.layers.0.mlp.mystery.weight", torch.zeros(1))])


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_a_group_of_one_runs_the_parallel_path_and_changes_nothing(
    folders: dict[str, str], one_rank: dict[str, Any], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU twin of tests/test_distributed_gpu.py: a gloo group of one rank sends every layer through
    its collectives (counted), and the logits stay one rank's."""
    from tessera.distributed import comm, destroy, init_distributed
    from tessera.distributed.launch import _free_port

    calls: list[int] = []
    reduce = comm._reduce_
    monkeypatch.setattr(comm, "_reduce_", lambda x: (calls.append(x.shape[0]), reduce(x))[1])
    init_distributed(0, 1, "gloo", f"tcp://127.0.0.1:{_free_port()}", group_of_one=True)
    try:
        got = logits(build(folders[family]))[0]
    finally:
        destroy()
    layers = CONFIGS[family].get("num_hidden_layers", 2)
    assert len(calls) >= 2 * (2 * layers + 1)  # two forwards: embedding, attention and MLP of each layer
    assert rel_err(got, one_rank[family]) < 1e-6
