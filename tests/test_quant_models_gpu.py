"""Quantized models on a GPU: the embedded SmolLM2 in its GGUF blocks against the same model dequantized
(logits, memory, greedy text through the engine's graphs), and FP8 / MXFP4 models through every graph
kind (piecewise, full decode and extend graphs) equal to the same model run eagerly.

Run with `pytest -m gpu` after `scripts/gpu-setup.sh` and `scripts/stage-model.sh` (docs/gpu.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams
from tessera.loader.model_loader import load_model
from tests.conftest import rel_err
from tests.test_quant_models import _quantized
from tests.tp_model_workers import BASE, CONFIGS, logits

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
VOCAB = 4096


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())


def test_smollm2_gguf_blocks_against_dequantized_bf16() -> None:
    native, _, _ = load_model(None, torch.bfloat16, CUDA, quantization="gguf")  # Q4_1 / Q8_0 blocks
    plain, _, _ = load_model(None, torch.bfloat16, CUDA)
    assert len(_quantized(native)) == 4 * native.config.num_layers
    embed = native.model.embed_tokens  # tied to the head: one table in Q8_0 blocks, the file's bytes
    assert sum(t.nbytes for t in embed.buffers(recurse=False)) == 30_081_024
    ratio = _weight_bytes(native) / _weight_bytes(plain)
    # the file's size: Q4_1 layers (20 bytes per 32 weights, 0.3125x bf16's) and the Q8_0 table (34 per 32),
    # 0.359x in all; 0.361x with the rotary tables both hold (measured on a CPU)
    assert ratio < 0.37, ratio
    got, want = logits(native)[0], logits(plain)[0]
    assert rel_err(got, want) < 2e-2  # the same weights; bf16 rounding of the GEMMs' outputs differs


def test_smollm2_gguf_greedy_text_through_graphs() -> None:
    prompts = ["What is the capital of France?", "Count from one to ten:", "def fibonacci(n):"]
    params = [SamplingParams(max_tokens=24, ignore_eos=True)] * len(prompts)
    with LLM(None, quantization="gguf") as llm:
        graphed = [o.token_ids for o in llm.generate(prompts, params)]
        stats = llm.stats()["graphs"]
    assert sum(sum(sizes.values()) for sizes in stats["replays"].values()) > 0, stats
    with LLM(None, quantization="gguf", disable_cuda_graph=True, disable_piecewise_cuda_graph=True) as llm:
        eager = [o.token_ids for o in llm.generate(prompts, params)]
    assert graphed == eager


@pytest.mark.parametrize("quantization", ["fp8", "fp8_block", "mxfp4"])
@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_quantized_models_through_every_graph_kind_equal_eager(
    tmp_path: Path, family: str, quantization: str
) -> None:
    from tokenizers import Tokenizer, models

    config = BASE | CONFIGS[family] | {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64,
                                       "moe_intermediate_size": 128, "vocab_size": VOCAB,
                                       "max_position_embeddings": 1024}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i}": i for i in range(VOCAB)}  # a tokenizer of its own: no model wheel needed
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 5, 17, 40, 100, 300)]
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * len(prompts)
    settings = dict(load_format="dummy", quantization=quantization, dtype="bfloat16")
    with LLM(str(tmp_path), **settings) as llm:
        graphed = [o.token_ids for o in llm.generate(prompts, params)]
        stats = llm.stats()["graphs"]
    fp8_experts = family == "qwen3-moe" and quantization.startswith("fp8")  # not capture-safe: eager
    replays = sum(sum(sizes.values()) for sizes in stats["replays"].values())
    assert (replays == 0) if fp8_experts else (replays > 0 and not stats["eager_fallbacks"]), stats
    with LLM(str(tmp_path), disable_cuda_graph=True, disable_piecewise_cuda_graph=True, **settings) as llm:
        eager = [o.token_ids for o in llm.generate(prompts, params)]
    same = sum(a == b for a, b in zip(graphed, eager, strict=True))
    assert same >= len(prompts) - 1, (graphed, eager)  # bf16: a near-tie may flip one continuation
