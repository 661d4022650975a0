"""Tensor and expert parallelism on several GPUs of one host (NCCL, CUDA graphs): what issue 23 runs.
Each family's greedy tokens at TP 2 (and TP 4 where four GPUs are visible) equal TP 1's; graphs on
equal graphs off at TP 2, with the all-reduces inside the pieces and as split ops; EP 2 equals EP 1 for
the MoE families. Skipped with fewer GPUs than the case needs.

Run with `pytest -m gpu tests/test_tp_gpu.py` on a machine with 2 or 4 GPUs (docs/gpu.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams
from tests.tp_model_workers import BASE, CONFIGS

pytestmark = pytest.mark.gpu

VOCAB = 49152  # the default model's tokenizer, which these folders borrow
# sizes that split whole over 4 ranks (heads, KV heads replicated or split, MLPs, experts)
SIZES = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
         "max_position_embeddings": 1024}  # fmt: skip
PROMPTS = [[(13 * i + 5) % VOCAB for i in range(n)] for n in (1, 7, 33, 150, 400)]
PARAMS = [SamplingParams(max_tokens=16, ignore_eos=True)] * len(PROMPTS)


def _needs(gpus: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < gpus, reason=f"needs {gpus} GPUs")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-gpu")
    out = {}
    for family in CONFIGS:
        folder = root / family
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(BASE | CONFIGS[family] | SIZES))
        out[family] = folder
    return out


def _tokens(folder: Path, **settings: Any) -> list[list[int]]:
    with LLM(str(folder), load_format="dummy", dtype="float32", **settings) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def one_gpu(folders: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {family: _tokens(folder) for family, folder in folders.items()}


@_needs(2)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_tp2_gives_tp1_tokens(folders: dict[str, Path], one_gpu: dict[str, Any], family: str) -> None:
    assert _tokens(folders[family], tensor_parallel_size=2) == one_gpu[family]


@_needs(4)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_tp4_gives_tp1_tokens(folders: dict[str, Path], one_gpu: dict[str, Any], family: str) -> None:
    assert _tokens(folders[family], tensor_parallel_size=4) == one_gpu[family]


@_needs(2)
@pytest.mark.parametrize("family", ["deepseek-v2", "qwen3-moe"])
def test_ep2_gives_ep1_tokens(folders: dict[str, Path], one_gpu: dict[str, Any], family: str) -> None:
    assert _tokens(folders[family], tensor_parallel_size=2, expert_parallel_size=2) == one_gpu[family]


@_needs(2)
@pytest.mark.parametrize("placement", ["inside", "split"])
def test_tp2_graphs_on_equal_graphs_off(folders: dict[str, Path], placement: str) -> None:
    eager = _tokens(folders["llama"], tensor_parallel_size=2, disable_cuda_graph=True,
                    disable_piecewise_cuda_graph=True)  # fmt: skip
    assert _tokens(folders["llama"], tensor_parallel_size=2, all_reduce_placement=placement) == eager
