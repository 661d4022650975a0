"""Speculative decoding on a GPU with SmolLM2: greedy output equals plain decoding's (float32, where batch
shapes cannot round a tie differently), every proposer's verify batches replay graphs (full or
piecewise, never eager within the captured range), and every page comes back.

Run with `pytest -m gpu` after `scripts/gpu-setup.sh` and `scripts/stage-model.sh` (docs/gpu.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams
from tessera.loader.gguf_file import GGUFFile
from tessera.loader.model_loader import default_model_path
from tessera.testing.eagle_checkpoint import save_random_eagle_head

pytestmark = pytest.mark.gpu

PROMPTS = [
    "Repeat the following text exactly: the quick brown fox jumps over the lazy dog, then the dog sleeps.",
    "Count from 1 to 30: 1, 2, 3,",
    "Write a haiku about graphs.",
    "What is 17 times 23? Think step by step.",
    "def fibonacci(n):",
]
PROPOSERS: dict[str, dict[str, Any]] = {
    "ngram": {"speculative_algorithm": "NGRAM", "speculative_num_steps": 4},
    "self-draft": {"speculative_algorithm": "STANDALONE", "speculative_draft_layers": 8},
    # the target drafting for itself: every draft is the target's own choice
    "itself": {"speculative_algorithm": "STANDALONE", "speculative_num_steps": 5},
}  # fmt: skip
PARAMS = SamplingParams(max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def plain() -> list[list[int]]:
    llm = LLM(dtype="float32")
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("proposer", [*PROPOSERS, "eagle-random"])
def test_greedy_speculation_equals_plain_decoding_and_replays_graphs(
    proposer: str, plain: list[list[int]], tmp_path: Path
) -> None:
    if proposer == "eagle-random":  # a seeded random head: acceptance ~0, the path is what is tested
        save_random_eagle_head(tmp_path, GGUFFile(default_model_path()).config)
        spec = {"speculative_algorithm": "EAGLE", "speculative_draft_model_path": str(tmp_path)}
    elif proposer == "itself":
        spec = PROPOSERS[proposer] | {"speculative_draft_model_path": str(default_model_path())}
    else:
        spec = PROPOSERS[proposer]
    llm = LLM(dtype="float32", **spec)
    got = [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert got == plain
    stats = llm.stats()
    assert stats["pages_free"] + stats["pages_evictable"] == stats["pages_usable"]
    assert sum(stats["spec_accepted"]) > 0
    if proposer != "ngram":  # the draft's own graphs replay too
        draft = llm.proposer.runner.graph_stats()  # type: ignore[union-attr]
        assert not draft["eager_fallbacks"] and draft["replays"], draft
    graphs = stats["graphs"]
    assert not graphs["eager_fallbacks"], graphs  # every verify replayed a graph
    assert sum(graphs["replays"].get("full-extend", {}).values()) > 0, graphs  # small verifies: full graphs
    if proposer == "itself":  # all accepted but where a verify rounds a near tie otherwise (float32: rare)
        accepted = stats["spec_accepted"]
        assert accepted[0] <= sum(accepted) // 20, accepted


def test_bfloat16_speculation_serves_and_accepts() -> None:
    """bfloat16, the serving dtype: a verify batch rounds unlike a decode, so outputs may part from plain
    decoding's after a near tie; they must still be whole, and the repeat prompt accept drafts."""
    llm = LLM(**PROPOSERS["ngram"])
    outs = llm.generate(PROMPTS, PARAMS)
    assert all(len(o.token_ids) == PARAMS.max_tokens for o in outs)
    accepted = llm.stats()["spec_accepted"]
    assert sum(k * n for k, n in enumerate(accepted)) > 0, accepted


@pytest.mark.parametrize(
    "spec",
    [
        {"speculative_algorithm": "STANDALONE", "speculative_draft_layers": 2, "speculative_num_steps": 3},
        {"speculative_algorithm": "EAGLE", "speculative_num_steps": 3},
        {"speculative_algorithm": "EAGLE", "speculative_num_steps": 1},
    ],
    ids=["self-draft", "eagle", "eagle-k1"],
)
def test_drafts_on_the_device_through_full_graphs_without_the_model(
    tmp_path: Path, spec: dict[str, Any]
) -> None:
    """A random Llama with a tokenizer of its own (no model wheel): its first layers, or a random EAGLE
    head, draft on the device; requests finish at different lengths, so smaller verify batches replay
    the full graphs that larger ones staged their draft placeholders into. Greedy output equals plain
    decoding's, every verify replays a graph, and every page comes back."""
    from tokenizers import Tokenizer, models

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": 2}  # fmt: skip
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(1024)}, unk_token="t0")).save(
        str(model / "tokenizer.json")
    )
    if spec["speculative_algorithm"] == "EAGLE":
        spec = spec | {"speculative_draft_model_path": str(save_random_eagle_head(tmp_path / "head", config))}
    gen = torch.Generator().manual_seed(0)
    # repeated prompts: a random model falls into loops, so some drafts are accepted
    prompts = [torch.randint(3, 1024, (n,), generator=gen).tolist() * 3 for n in (5, 17, 40, 9, 70)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (48, 20, 33, 12, 40)]
    settings = {"load_format": "dummy", "dtype": "float32"}
    with LLM(str(model), **settings) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(str(model), **settings, **spec) as llm:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        stats = llm.stats()
    assert got == want
    assert stats["pages_free"] + stats["pages_evictable"] == stats["pages_usable"]
    graphs = stats["graphs"]
    assert not graphs["eager_fallbacks"], graphs
    assert sum(graphs["replays"].get("full-extend", {}).values()) > 0, graphs
