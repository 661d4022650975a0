"""Llama-family models against HF transformers on tiny random configs (float32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from tessera.engine.batch import SPLIT_MIN_SHORT
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence
from tessera.layers.attention_metadata import SHORT_QUERY_LEN
from tessera.model_config import ModelConfig
from tessera.models.decoder import CausalLM

from .conftest import needs_triton_on_cpu
from .runner_driver import RunnerDriver, make_runner

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
FAMILIES = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "LlamaForCausalLM-llama3-rope": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "Qwen2ForCausalLM": ("Qwen2Config", {"tie_word_embeddings": True}),
    "Qwen2ForCausalLM-yarn-rope": (
        "Qwen2Config",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    ),
    "Qwen2ForCausalLM-yarn-mscale": (
        "Qwen2Config",
        {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5}},
    ),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 32}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}),
    "MixtralForCausalLM": (
        "MixtralConfig",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48, "sliding_window": None},
    ),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        # layer 0 dense (mlp_only_layers), layer 1 sparse; top-k weights not renormalised
        {
            "head_dim": 32,
            "num_experts": 6,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 40,
            "norm_topk_prob": False,
            "mlp_only_layers": [0],
        },
    ),
}


def hf_and_ours(family: str) -> tuple[torch.nn.Module, CausalLM]:
    config_cls, extra = FAMILIES[family]
    hf_cfg = getattr(transformers, config_cls)(**(TINY | extra))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # random, non-trivial norms and biases
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    ours = CausalLM(cfg).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def _runner(model: CausalLM, backend: str = "torch", num_pages: int = 32) -> RunnerDriver:
    return make_runner(model, num_pages=num_pages, page_size=4, attention_backend=backend)


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton_on_cpu)]


def _seq(ids: list[int]) -> Sequence:
    return Sequence(prompt_token_ids=ids, params=SamplingParams())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_hf(family: str, backend: str) -> None:
    hf, ours = hf_and_ours(family)
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    runner = _runner(ours, backend)
    # every prefix's last logits, via a prefill then one decode step per token
    seq = _seq(ids[0].tolist())
    got = [runner.run([(seq, 6)])[0]]
    for _ in range(5):
        got.append(runner.run([(seq, 1)])[0])
    torch.testing.assert_close(torch.stack(got), ref[5:], rtol=1e-4, atol=1e-4)


def test_prefix_cached_extend_equals_full_prefill() -> None:
    _, ours = hf_and_ours("LlamaForCausalLM")
    ids = torch.randint(0, 256, (13,)).tolist()
    full = _runner(ours).run([(_seq(ids), 13)])
    runner = _runner(ours)
    seq = _seq(ids)
    runner.run([(seq, 8)])  # chunk 1 fills the cache ...
    chunked = runner.run([(seq, 5)])  # ... chunk 2 attends over it
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decodes", [2, SPLIT_MIN_SHORT], ids=["one-launch", "two-launches"])
def test_mixed_batch_equals_its_decodes_and_prefill_run_apart(backend: str, decodes: int) -> None:
    """Decodes and a whole prefill in one batch, the prefill listed among the decodes: its rows are
    reordered (short sequences first) and, with enough decodes, attention runs as two launches; the
    logits still come back in the order asked, equal to the decodes run as a decode batch of their own
    and the prefill run alone."""
    _, ours = hf_and_ours("Qwen3ForCausalLM")
    gen = torch.Generator().manual_seed(decodes)
    prompts = [torch.randint(0, 256, (4 + i % 7,), generator=gen).tolist() for i in range(decodes)]
    prompts.insert(1, torch.randint(0, 256, (SHORT_QUERY_LEN + 5,), generator=gen).tolist())
    runner = _runner(ours, backend, num_pages=128)
    apart = [_seq(ids) for ids in prompts]
    runner.run([(s, len(s.prompt_token_ids) - 1) for i, s in enumerate(apart) if i != 1])
    decoded = runner.run([(s, 1) for i, s in enumerate(apart) if i != 1])
    prefilled = runner.run([(apart[1], len(prompts[1]))])
    alone = [decoded[0], prefilled[0], *decoded[1:]]
    seqs = [_seq(ids) for ids in prompts]
    runner.run([(s, len(s.prompt_token_ids) - 1) for i, s in enumerate(seqs) if i != 1])  # cached
    work = [(s, 1 if i != 1 else len(s.prompt_token_ids)) for i, s in enumerate(seqs)]
    parts = runner.batch(work).metadata.kernel.parts
    assert [p.max_q_len for p in parts] == ([1, SHORT_QUERY_LEN + 5] if decodes >= SPLIT_MIN_SHORT else [])
    mixed = runner.run(work)
    torch.testing.assert_close(mixed, torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_unknown_checkpoint_tensor_is_an_error() -> None:
    _, ours = hf_and_ours("LlamaForCausalLM")
    with pytest.raises(KeyError, match="no parameter"):
        ours.load_weights([("model.layers.0.mystery.weight", torch.zeros(1))])


@needs_triton_on_cpu
@pytest.mark.parametrize(
    ("family", "moe_backend", "strategy"),
    # each strategy with each family; grouped_mm under the strategy that traces it with Dynamo
    [
        ("LlamaForCausalLM", "auto", "breakable"),
        ("LlamaForCausalLM", "auto", "compile"),
        ("Qwen3MoeForCausalLM", "auto", "breakable"),
        ("Qwen3MoeForCausalLM", "grouped_mm", "compile"),
    ],
)
def test_decode_and_piecewise_graphs_match_eager(family: str, moe_backend: str, strategy: str) -> None:
    """Graphs (emulated: the same static buffers and padding) against eager. For the MoE family the
    padded rows of every replay are routed nowhere by a mask computed on the device at replay time; with
    grouped_mm the experts run as torch._grouped_mm, against the eager reference loop."""
    _, ours = hf_and_ours(family)
    reference = copy.deepcopy(ours)  # a runner sets its MoE backend on the model's modules
    graphs = make_runner(
        ours,
        num_pages=32,
        page_size=4,
        attention_backend="triton",
        emulate_graphs_on_cpu=True,
        cuda_graph_max_bs=4,
        extend_cuda_graph_max_tokens=0,  # extend batches through the piecewise graphs
        piecewise_cuda_graph_tokens=(8, 16),
        piecewise_cuda_graph_strategy=strategy,
        moe_runner_backend=moe_backend,
    )
    assert graphs.full_graphs is not None
    assert [d.num_tokens for d in graphs.full_graphs.descriptors] == [1, 2, 4]
    eager = _runner(reference)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 11, 3)]
    late = torch.randint(0, 256, (6,)).tolist()
    runs = {"graphs": (graphs, [_seq(p) for p in prompts]), "eager": (eager, [_seq(p) for p in prompts])}
    logits: dict[str, list[torch.Tensor]] = {"graphs": [], "eager": []}
    for name, (runner, seqs) in runs.items():
        logits[name].append(runner.run([(s, len(s.prompt_token_ids)) for s in seqs]))  # prefill: 19 tokens
        logits[name].append(runner.run([(_seq(late), 6)]))  # a 6-token prefill replays the 8-token graphs
        for step in range(4):
            active = seqs if step < 2 else seqs[:1]  # 3 sequences (padded to 4), then 1
            for s in active:  # feed a fixed next token so both runs see the same inputs
                s.output_token_ids.append(step + 7)
            logits[name].append(runner.run([(s, 1) for s in active]))
    for got, ref in zip(logits["graphs"], logits["eager"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    stats = graphs.graph_stats()
    assert stats["replays"] == {"full-decode": {"4": 2, "1": 2}, "piecewise": {"8": 1}}
    assert stats["eager_fallbacks"] == {"oversize": 1}  # the 19-token prefill > 16


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trips_through_hf(family: str) -> None:
    _, ours = hf_and_ours(family)
    assert ModelConfig.from_hf(ours.config.to_hf()) == ours.config


def test_bench_batches_replay_without_changing_the_sequences() -> None:
    from benchmarks.step import make_batch, page_manager

    _, ours = hf_and_ours("LlamaForCausalLM")
    runner = _runner(ours).runner
    kv = page_manager(runner)
    extend = make_batch(runner, "extend", 13, 8, kv=kv)
    assert extend.input_ids.shape[0] == 13 and len(extend.seqs) == 8
    decode = make_batch(runner, "decode", 3, 3, context=20, kv=kv)
    assert decode.metadata.kernel.max_q_len == 1
    assert [s.context_len for s in decode.metadata.seqs] == [20] * 3
    for batch in (extend, decode):
        cached = [s.num_cached for s in batch.seqs]
        first, again = runner.forward(batch), runner.forward(batch)
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        assert [s.num_cached for s in batch.seqs] == cached
        for seq in batch.seqs:
            kv.release(seq, keep_prefix=False)
    assert kv.num_free == kv.num_usable


def test_hf_baseline_model_carries_our_weights() -> None:
    from benchmarks.hf_baselines import hf_eager_step, hf_model

    _, ours = hf_and_ours("LlamaForCausalLM")
    ids = torch.randint(0, 256, (7,))
    got = _runner(ours).run([(_seq(ids.tolist()), 7)])[0]
    ref = hf_eager_step(hf_model(ours))(ids)[0, -1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
