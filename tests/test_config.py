"""EngineConfig: flat settings routed to the part that owns them, derived values, checks, and the CLI
building the same config from its flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tessera.cli import add_runner_flags, engine_config
from tessera.engine.config import EngineConfig, RunnerConfig, SchedulerConfig, SpeculativeConfig


def test_flat_settings_go_to_the_part_that_owns_them() -> None:
    config = EngineConfig.create("m.gguf", device="cpu", chunked_prefill_size=512, cuda_graph_max_bs=8)
    assert config.model == "m.gguf" and config.device == "cpu"
    assert config.scheduler == SchedulerConfig(chunked_prefill_size=512)
    assert config.runner == RunnerConfig(cuda_graph_max_bs=8)
    with pytest.raises(TypeError, match="unknown engine settings: page_sise"):
        EngineConfig.create(page_sise=4)


def test_derived_values_follow_what_they_derive_from() -> None:
    config = EngineConfig.create(chunked_prefill_size=512, max_running_requests=32)
    assert config.scheduler.token_budget == 512  # max_num_batched_tokens defaults to the chunk
    assert dataclasses.replace(config.scheduler, chunked_prefill_size=64).token_budget == 64
    assert config.decode_graph_max_bs == 32  # no decode batch outgrows the running limit
    assert config.graph_max_tokens() == 512


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mem_fraction": 1.0}, "mem_fraction"),
        ({"page_size": 0}, "page_size"),
        ({"load_format": "npz"}, "load format"),
        ({"dtype": "int8"}, "dtype"),
        ({"attention_backend": "flash"}, "attention backend"),
        ({"piecewise_cuda_graph_strategy": "full"}, "strategy"),
        ({"max_running_requests": 0}, "budgets"),
        ({"max_num_batched_tokens": 0}, "budgets"),
        ({"speculative_num_steps": 3}, "need --speculative-algorithm"),
        ({"speculative_algorithm": "MEDUSA"}, "speculative algorithm"),
        (
            {"speculative_algorithm": "NGRAM", "speculative_num_steps": 2, "speculative_num_draft_tokens": 4},
            "must be --speculative-num-steps \\+ 1 = 3",
        ),
        ({"speculative_algorithm": "NGRAM", "speculative_draft_layers": 2}, "takes no draft model"),
        ({"speculative_algorithm": "STANDALONE"}, "STANDALONE needs a draft"),
        (
            {
                "speculative_algorithm": "STANDALONE",
                "speculative_draft_layers": 2,
                "speculative_draft_model_path": "d",
            },
            "not both",
        ),
        ({"speculative_algorithm": "EAGLE"}, "EAGLE needs"),
        ({"speculative_algorithm": "NGRAM", "speculative_token_map": "m.pt"}, "token-map is EAGLE's"),
        ({"speculative_token_map": "m.pt"}, "speculative-token-map need --speculative-algorithm"),
        ({"speculative_algorithm": "NGRAM", "speculative_num_steps": 0}, "steps must be in"),
        (
            {
                "speculative_algorithm": "NGRAM",
                "speculative_ngram_min_match_window_size": 5,
                "speculative_ngram_max_match_window_size": 4,
            },
            "n-gram match windows",
        ),
    ],
)
def test_bad_settings_are_refused_up_front(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.create(**settings)


def _flags(*argv: str) -> EngineConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    add_runner_flags(parser)
    return engine_config(parser.parse_args(argv))


def test_the_cli_defaults_are_the_config_defaults() -> None:
    assert _flags() == EngineConfig()


def test_the_cli_builds_every_part_from_its_flags() -> None:
    config = _flags(
        "--model", "x", "--chunked-prefill-size", "256", "--page-size", "32",
        "--piecewise-cuda-graph-tokens", "8", "16", "--disable-cuda-graph", "--max-running-requests", "4",
    )  # fmt: skip
    assert config.model == "x" and config.page_size == 32
    assert config.scheduler.chunked_prefill_size == 256 and config.scheduler.max_running_requests == 4
    assert config.runner.piecewise_cuda_graph_tokens == (8, 16) and config.runner.disable_cuda_graph


def test_speculative_settings_in_sglangs_spelling() -> None:
    config = _flags("--speculative-algorithm", "standalone", "--speculative-num-draft-tokens", "5",
                    "--speculative-draft-layers", "4")  # fmt: skip
    spec = config.speculative
    assert spec == SpeculativeConfig("STANDALONE", None, 5, None, 4)
    assert (spec.algorithm, spec.num_steps) == ("STANDALONE", 4)  # 5 tokens verified: 4 drafts + 1
    assert EngineConfig().speculative.num_steps == 0
    assert EngineConfig.create(speculative_algorithm="ngram").speculative.num_steps == 3
    eagle = _flags("--speculative-algorithm", "EAGLE", "--speculative-draft-model-path", "head",
                   "--speculative-token-map", "hot.pt").speculative  # fmt: skip
    assert (eagle.speculative_draft_model_path, eagle.speculative_token_map) == ("head", "hot.pt")
