"""The graph runtime's padding-poison mode on every model family (dense, MoE, MLA + MoE): each padded
replay is re-run with poisoned padding (token ids from other rows, so every kernel sees live values) and
must leave every real row's output bit-identical, else PaddingLeakError. CPU, emulated graphs."""

from __future__ import annotations

import pytest
import torch

from tessera.engine.config import MLA_GRAPH_MAX_TOKENS, EngineConfig
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence

from . import test_deepseek, test_llama
from .runner_driver import make_runner

pytest.importorskip("transformers")
MODELS = {
    "dense": lambda: test_llama.hf_and_ours("Qwen3ForCausalLM")[1],
    "moe": lambda: test_llama.hf_and_ours("Qwen3MoeForCausalLM")[1],
    "mla+moe": lambda: test_deepseek.hf_and_ours("DeepseekV3ForCausalLM")[1],
}


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("strategy", ["breakable", "compile"])
def test_poisoned_padding_leaves_real_rows_bit_identical(family: str, strategy: str) -> None:
    model = MODELS[family]()
    runner = make_runner(model, num_pages=48, page_size=4, emulate_graphs_on_cpu=True,
                         piecewise_cuda_graph_tokens=(8, 16), piecewise_cuda_graph_strategy=strategy,
                         debug_poison_padding=True)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    seqs = [Sequence(torch.randint(0, 256, (n,), generator=gen).tolist(), SamplingParams()) for n in (5, 9)]
    runner.run([(seqs[0], 5)])  # 5 real rows padded to 8
    seqs[0].output_token_ids.append(7)
    runner.run([(seqs[0], 1), (seqs[1], 9)])  # a decode and a prefill: 10 padded to 16
    stats = runner.graph_stats()
    assert stats["replays"] == {"piecewise": {"8": 1, "16": 1}} and stats["padded_tokens"] == 3 + 6


def test_mla_models_cap_the_captured_range_below_a_larger_chunked_prefill() -> None:
    config = EngineConfig.create(chunked_prefill_size=8192)
    assert config.graph_max_tokens(mla=True) == MLA_GRAPH_MAX_TOKENS < 8192
    assert config.graph_max_tokens() == 8192
    explicit = EngineConfig.create(chunked_prefill_size=8192, piecewise_cuda_graph_max_tokens=4096)
    assert explicit.graph_max_tokens(mla=True) == 4096
