"""The engine on a GPU (bf16): HF parity on both attention backends, and piecewise graphs on vs off.

Run with `pytest -m gpu` after `scripts/gpu-setup.sh` and `scripts/stage-model.sh` (docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tessera.engine.sampling import SamplingParams

from .conftest import assert_greedy_close, rel_err
from .runner_driver import make_runner
from .test_llama import FAMILIES, hf_and_ours

pytestmark = pytest.mark.gpu

SIZES = (8, 16, 32, 64, 128, 256)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_bf16_logits_match_hf(family: str, backend: str) -> None:
    from tessera.engine.sequence import Sequence

    hf, ours = hf_and_ours(family)
    hf, ours = hf.cuda().to(torch.bfloat16), ours.cuda().to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 23), device="cuda")
    ref = hf(ids).logits[0, -1].float()
    runner = make_runner(
        ours, num_pages=16, page_size=16, attention_backend=backend, disable_piecewise_cuda_graph=True
    )
    got = runner.run([(Sequence(ids[0].tolist(), SamplingParams()), 23)])[0]
    assert rel_err(got, ref) < 2e-2


WORDS = "the quick brown fox jumps over a lazy dog while graphs replay their pieces".split()  # noqa: SIM905


def _prompts(encode: Callable[[str], list[int]]) -> list[list[int]]:
    """64 prompts cut from English-like text: one of every capture size, one just below each, then
    other lengths (natural text keeps greedy choices clear of near-ties, unlike random tokens)."""
    text = encode(" ".join(WORDS[(i * 5) % len(WORDS)] + ("." if i % 11 == 10 else "") for i in range(600)))
    gen = torch.Generator().manual_seed(0)
    lengths = sorted(set(SIZES) | {s - 3 for s in SIZES})
    lengths += [int(n) for n in torch.randint(2, 240, (64 - len(lengths),), generator=gen)]
    starts = torch.randint(0, len(text) - 256, (64,), generator=gen).tolist()
    return [text[s : s + n] for s, n in zip(starts, lengths, strict=True)]


@pytest.mark.parametrize("mode", ["breakable", "compile", "extend-graphs"])
def test_graphs_on_and_off_give_the_same_greedy_tokens(mode: str) -> None:
    """Piecewise graphs of either strategy alone, or with full graphs for extend batches of up to 256
    tokens in up to 8 sequences (the piecewise graphs take the rest)."""
    from tessera.engine.llm import LLM

    params = SamplingParams(max_tokens=8, ignore_eos=True, top_logprobs=2)
    # no prefix sharing: every prompt's prefill is exactly its length, so sizes land where planned
    common = {"chunked_prefill_size": 256, "disable_radix_cache": True}
    full = mode == "extend-graphs"
    graphs = LLM(
        piecewise_cuda_graph_tokens=SIZES,
        piecewise_cuda_graph_strategy="compile" if mode == "compile" else "breakable",
        extend_cuda_graph_max_tokens=256 if full else 0,
        **common,
    )
    # decode graphs on both sides (as before extend graphs existed): the comparison is of extend batches
    eager = LLM(disable_piecewise_cuda_graph=True, extend_cuda_graph_max_tokens=0, **common)
    prompts = _prompts(graphs.tokenizer.encode)
    # one prompt at a time: each capture size and a size between two of them is its own prefill batch
    planned = len(set(SIZES) | {s - 3 for s in SIZES})
    assert_greedy_close(
        [graphs.generate([p], params)[0] for p in prompts[:planned]],
        [eager.generate([p], params)[0] for p in prompts[:planned]],
    )
    stats = graphs.runner.graph_stats()
    replays = stats["replays"]  # {kind: {padded size: count}}
    if full:  # every prefill through an extend graph; each graph's seven decodes through decode graphs
        assert sum(replays.get("full-extend", {}).values()) == planned and "piecewise" not in replays, stats
    else:
        assert set(replays.get("piecewise", {})) == {str(s) for s in SIZES}, stats
    # then all 64 together: chunked prefills mixed with decodes, decode batches up to 64
    assert_greedy_close(graphs.generate(prompts, params), eager.generate(prompts, params))
    stats = graphs.runner.graph_stats()
    assert not stats["eager_fallbacks"], stats
    assert sum(stats["replays"].get("full-decode", {}).values()) > 0, stats


@torch.no_grad()
def test_full_graphs_match_eager_with_poisoned_padding() -> None:
    """Extend and decode full graphs on CUDA against eager (bf16, relative error), with the debug check
    on: each padded replay repeated with the padded rows' inputs shuffled must leave real rows
    bit-identical."""
    from tessera.engine.sequence import Sequence

    _, ours = hf_and_ours("LlamaForCausalLM")
    ours = ours.cuda().to(torch.bfloat16)
    graphs = make_runner(ours, num_pages=64, page_size=16, debug_poison_padding=True, cuda_graph_max_bs=4,
                         piecewise_cuda_graph_tokens=(16, 32, 64))  # fmt: skip
    eager = make_runner(
        ours, num_pages=64, page_size=16, disable_piecewise_cuda_graph=True, disable_cuda_graph=True
    )
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    logits: dict[str, list[torch.Tensor]] = {"graphs": [], "eager": []}
    for name, runner in (("graphs", graphs), ("eager", eager)):
        a, b, c = (Sequence(p, SamplingParams()) for p in prompts)
        logits[name].append(runner.run([(a, 5)]))  # 5 tokens padded to 16
        logits[name].append(runner.run([(b, 23), (c, 40)]))  # 63 padded to 64
        for s in (a, b, c):
            s.output_token_ids.append(7)
        logits[name].append(runner.run([(s, 1) for s in (a, b, c)]))  # 3 decodes padded to 4
    for got, ref in zip(logits["graphs"], logits["eager"], strict=True):
        assert rel_err(got, ref) < 2e-2
    stats = graphs.stats
    assert sum(stats.sizes("full-extend").values()) == 2, stats
    assert sum(stats.sizes("full-decode").values()) == 1, stats
