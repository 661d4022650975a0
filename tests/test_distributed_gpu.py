"""The tensor-parallel path on one GPU: a process group of one rank over NCCL, the model's all-reduces
and the LM head's all-gather running inside the captured graphs, giving what the model gives with no
process group at all.

Run with `pytest -m gpu` after `scripts/gpu-setup.sh` (docs/gpu.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.distributed import comm, destroy, init_distributed, tp_group
from tessera.distributed.launch import _free_port
from tessera.loader.model_loader import dummy_model
from tests.conftest import rel_err
from tests.tp_model_workers import BASE, CONFIGS, logits

pytestmark = pytest.mark.gpu

GRAPHS = {"piecewise_cuda_graph_tokens": (8, 16)}  # prefill of 12 tokens -> 16, the decode of 2 -> 8


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
@pytest.mark.parametrize("placement", ["inside", "split"])
def test_world_of_one_over_nccl_with_graphs_equals_no_group(
    tmp_path: Path, family: str, placement: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE | CONFIGS[family]))
    reference = logits(dummy_model(tmp_path, torch.float32, "cuda"), **GRAPHS)[0]
    calls: list[int] = []
    reduce = comm._reduce_
    monkeypatch.setattr(comm, "_reduce_", lambda x: (calls.append(x.shape[0]), reduce(x))[1])
    init_distributed(0, 1, "nccl", f"tcp://127.0.0.1:{_free_port()}", group_of_one=True)
    previous = comm.set_all_reduce_placement(placement)  # type: ignore[arg-type]
    try:
        assert tp_group() is not None
        model = dummy_model(tmp_path, torch.float32, "cuda")
        got, stats = logits(model, **GRAPHS)
    finally:
        comm.set_all_reduce_placement(previous)
        destroy()
    assert calls, "no all-reduce ran"
    replays: dict[str, Any] = stats["replays"]
    assert replays == {"piecewise": {"16": 1, "8": 1}}, stats
    assert rel_err(got, reference) < 1e-5
