"""Speculative decoding end to end on CPU: with every proposer, greedy output equals plain decoding token
for token (Llama, Qwen3, DeepSeek-V2 MLA, Qwen3-MoE with random weights), verify batches go through the
piecewise graphs padded, chunked prefills run beside verifies, requests stop mid-chain exactly where
plain decoding stops, and every KV page comes back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams
from tessera.engine.speculative import DeviceDrafts

from .conftest import assert_greedy_close, needs_triton_on_cpu

# vocabulary of the embedded model's tokenizer, which a dummy-weight folder without one borrows
VOCAB = 49152
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)  # fmt: skip
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16},
    "deepseek-v2": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "num_key_value_heads": 4,
        "kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 12, "n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 24,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 1.5,
        "topk_method": "greedy",
    },
    "qwen3-moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 16,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
        "norm_topk_prob": True,
    },
}  # fmt: skip
# prompts of several lengths, one that repeats itself (the n-gram proposer's case)
PROMPTS = [
    list(range(300, 340)),
    [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9],
    [1000 + 37 * i % 500 for i in range(70)],
    [42],
]
# small capture sizes, so verify batches replay padded; chunks of 16 tokens run beside verifies
GRAPHS = {"emulate_graphs_on_cpu": True, "piecewise_cuda_graph_tokens": (8, 32, 128)}
SETTINGS = {"device": "cpu", "load_format": "dummy", "chunked_prefill_size": 16, **GRAPHS}


def _folder(tmp_path: Path, family: str) -> Path:
    folder = tmp_path / family
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BASE | CONFIGS[family]))
    return folder


def _proposers(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        "ngram": {"speculative_algorithm": "NGRAM"},
        # the target drafting for itself: every draft is right
        "standalone-self": {
            "speculative_algorithm": "STANDALONE",
            "speculative_draft_model_path": str(folder),
        },
        "first-layer": {"speculative_algorithm": "STANDALONE", "speculative_draft_layers": 1},
    }


def _run(folder: Path, params: list[SamplingParams], **spec: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), **SETTINGS, **spec)
    outs = llm.generate(PROMPTS, params)
    return [o.token_ids for o in outs], llm


def _no_leak(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["pages_free"] + stats["pages_evictable"] == stats["pages_usable"], stats


PARAMS = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (40, 33, 25, 12)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[int]]]:
    """Plain greedy decoding of PROMPTS, per family (the reference every speculative run must equal)."""
    root = tmp_path_factory.mktemp("plain")
    return {family: _run(_folder(root, family), PARAMS)[0] for family in CONFIGS}


@pytest.mark.parametrize("proposer", ["ngram", "standalone-self", "first-layer"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_greedy_speculation_equals_plain_decoding(
    family: str, proposer: str, plain: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    folder = _folder(tmp_path, family)
    got, llm = _run(folder, PARAMS, speculative_num_steps=3, **_proposers(folder)[proposer])
    assert got == plain[family]
    _no_leak(llm)
    accepted = llm.stats()["spec_accepted"]
    assert sum(accepted) >= (1 if proposer == "ngram" else 10)  # verifies ran (n-gram: where it matched)
    if proposer == "standalone-self":  # a draft that is the target: every verify accepts all it drafted
        assert accepted[0] == 0 and accepted[3] > accepted[1] + accepted[2]
    graphs = llm.stats()["graphs"]
    assert not graphs["eager_fallbacks"], graphs  # verifies within the captured range replay graphs
    assert graphs["padded_tokens"] > 0


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("proposer", ["ngram", "standalone-self", "first-layer"])
def test_every_draft_length_keeps_greedy_output(
    steps: int, proposer: str, plain: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    folder = _folder(tmp_path, "llama")
    got, llm = _run(folder, PARAMS, speculative_num_steps=steps, **_proposers(folder)[proposer])
    assert got == plain["llama"]
    _no_leak(llm)
    if proposer == "standalone-self":
        accepted = llm.stats()["spec_accepted"]
        assert accepted[steps] > 0 and accepted[0] == 0


def test_a_self_draft_accepts_every_draft_it_had_room_for(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama")
    # NOTE: a token budget that always has room for drafts beside the 16-token prefill chunks: draft
    # room comes after every request's own tokens (test_scheduler covers who gets it when it is short)
    settings = {**SETTINGS, "max_num_batched_tokens": 64}
    llm = LLM(str(folder), **settings, **_proposers(folder)["standalone-self"], speculative_num_steps=4)
    seqs = [llm.add(p, params) for p, params in zip(PROMPTS, PARAMS, strict=True)]
    while llm.has_work:
        llm.step()
    for seq, params in zip(seqs, PARAMS, strict=True):
        # every verify accepts all 4 drafts but the last, whose room max_tokens may cut; besides the
        # verifies, only the prefill's token and at most one decode without room for a draft
        assert seq.spec_accepted >= 4 * (seq.spec_verifies - 1) and seq.spec_verifies >= 2
        assert params.max_tokens - (1 + seq.spec_verifies + seq.spec_accepted) in (0, 1)
    _no_leak(llm)


def test_requests_stop_mid_chain_exactly_where_plain_decoding_stops(
    plain: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    folder = _folder(tmp_path, "llama")
    reference = plain["llama"]
    # a stop token from the middle of each plain output, and max_tokens cutting inside a chain
    params = [
        SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=(reference[0][9],)),
        SamplingParams(max_tokens=7, ignore_eos=True),
        SamplingParams(max_tokens=25, ignore_eos=True, stop_token_ids=(reference[2][13],)),
        SamplingParams(max_tokens=12, ignore_eos=True, min_tokens=5, stop_token_ids=(reference[3][2],)),
    ]
    expected = _run(folder, params)[0]
    assert [len(t) for t in expected] == [10, 7, 14, 12]  # each stops inside what a verify would emit
    for proposer in ("standalone-self", "ngram"):
        got, llm = _run(folder, params, speculative_num_steps=5, **_proposers(folder)[proposer])
        assert got == expected, proposer
        _no_leak(llm)


def test_stop_strings_cut_a_verify_where_plain_decoding_does(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama")
    llm = LLM(str(folder), **SETTINGS)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    text = llm.generate([PROMPTS[0]], params)[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    with_stop = SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,))
    want = llm.generate([PROMPTS[0]], with_stop)[0]
    spec = LLM(str(folder), **SETTINGS, **_proposers(folder)["standalone-self"], speculative_num_steps=5)
    got = spec.generate([PROMPTS[0]], with_stop)[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    _no_leak(spec)


def test_seeded_sampling_gives_the_same_tokens_with_speculation_as_without(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama")
    llm = LLM(str(folder), **SETTINGS, **_proposers(folder)["first-layer"], speculative_num_steps=3)
    params = [
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True) for s in range(4)
    ]
    first = [o.token_ids for o in llm.generate(PROMPTS, params)]
    # the prompts now hit the prefix cache: other chunks, other steps with room for drafts
    again = [o.token_ids for o in llm.generate(PROMPTS, params)]
    plain = [o.token_ids for o in LLM(str(folder), **SETTINGS).generate(PROMPTS, params)]
    assert first == again == plain and len({tuple(t) for t in first}) == 4
    assert all(len(t) == 20 for t in first)
    assert sum(llm.stats()["spec_accepted"]) > 0
    _no_leak(llm)


def test_penalties_and_logprobs_match_plain_decoding(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama")
    params = [SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5,
                             logprobs=True, top_logprobs=2)] * len(PROMPTS)  # fmt: skip
    plain = LLM(str(folder), **SETTINGS).generate(PROMPTS, params)
    spec = LLM(str(folder), **SETTINGS, **_proposers(folder)["standalone-self"], speculative_num_steps=3)
    got = spec.generate(PROMPTS, params)
    for a, b in zip(plain, got, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    _no_leak(spec)


# ---------------------------------------------------------------- EAGLE


def _eagle(tmp_path: Path, echo: bool = False) -> tuple[Path, dict[str, Any]]:
    """The Llama target and a random EAGLE head; `echo`: a head whose output is its feature (its fc
    passes the feature through, its layer adds nothing), which drafts the target's last choice again."""
    from safetensors.torch import load_file, save_file

    from tessera.testing.eagle_checkpoint import save_random_eagle_head

    folder = _folder(tmp_path, "llama")
    head = tmp_path / "eagle-head"
    save_random_eagle_head(head, BASE | CONFIGS["llama"], seed=3)
    if echo:
        weights = load_file(head / "model.safetensors")
        h = BASE["hidden_size"]
        weights["fc.weight"] = torch.cat((torch.zeros(h, h), torch.eye(h)), dim=1)
        for name in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
            weights[name] = torch.zeros_like(weights[name])
        save_file(weights, head / "model.safetensors")
    return folder, {"speculative_algorithm": "EAGLE", "speculative_draft_model_path": str(head)}


def test_eagle_keeps_greedy_output_and_replays_its_head_in_graphs(
    plain: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    folder, spec = _eagle(tmp_path)
    got, llm = _run(folder, PARAMS, speculative_num_steps=3, **spec)
    assert got == plain["llama"]
    _no_leak(llm)
    assert sum(llm.stats()["spec_accepted"]) > 10
    head_graphs = llm.proposer.runner.graph_stats()  # type: ignore[union-attr]
    assert sum(head_graphs["replays"]["piecewise"].values()) > 0 and not head_graphs["eager_fallbacks"]


def test_eagle_drafts_accepted_in_a_loop_keep_greedy_output(
    plain: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    """An echoing head drafts the target's last choice again: accepted wherever the target repeats a
    token, as the random target does in a loop. Verifies then keep drafts, and the head goes on from the
    row past them, picked on the device before the verify's tokens reach the host."""
    folder, spec = _eagle(tmp_path, echo=True)
    llm = LLM(str(folder), **SETTINGS, **spec, speculative_num_steps=3)
    proposer = llm.proposer
    observe, checked = proposer.observe, []  # type: ignore[union-attr]

    def checking(work: list[Any], starts: list[int], target: Any) -> None:
        # the head's output is its feature: where each request drafts from next must be the target's
        # hidden state at the request's last kept position
        observe(work, starts, target)
        forward = target.last_batch
        for (seq, n), start, last in zip(work, starts, forward.last_rows.tolist(), strict=True):
            nxt = proposer._next.get(seq)  # type: ignore[union-attr]
            if nxt is not None and nxt.num_cached == seq.num_cached and seq.num_cached > start:
                row = last - n + 1 + (seq.num_cached - 1 - start)
                torch.testing.assert_close(nxt.observed.features[nxt.row], target.last_hidden[row])
                checked.append(n)

    proposer.observe = checking  # type: ignore[union-attr,method-assign]
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == plain["llama"]
    _no_leak(llm)
    accepted = llm.stats()["spec_accepted"]
    assert accepted[3] >= 2 and accepted[0] > 0, accepted  # whole chains kept, and chains cut
    assert len(checked) > 20 and 4 in checked  # verifies (1 + 3 rows) among them


def test_eagle_with_a_token_map_drafts_from_it_alone_and_keeps_greedy_output(
    plain: dict[str, list[list[int]]], tmp_path: Path
) -> None:
    folder, spec = _eagle(tmp_path)
    hot = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(6))[:2048]
    torch.save(hot, tmp_path / "hot.pt")
    llm = LLM(
        str(folder),
        **SETTINGS,
        **spec,
        speculative_num_steps=3,
        speculative_token_map=str(tmp_path / "hot.pt"),
    )
    drafted: list[int] = []
    propose = llm.proposer.propose  # type: ignore[union-attr]

    def recording(seqs: list[Any], rooms: list[int]) -> Any:
        drafts = propose(seqs, rooms)
        drafted.extend(t for d in _on_host(drafts) for t in d)
        return drafts

    llm.proposer.propose = recording  # type: ignore[union-attr,method-assign]
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == plain["llama"]
    _no_leak(llm)
    assert len(drafted) > 30 and set(drafted) <= set(hot.tolist())


def test_eagle_drafts_are_the_heads_chain_over_the_targets_features(tmp_path: Path) -> None:
    """Each proposal equals a dense recomputation: the target's features of every position so far (one
    prefill), the head over them, then its own chain — so the engine hands the head the right features
    at the right positions through chunked prefills and verifies."""
    pytest.importorskip("transformers")
    from .runner_driver import make_runner
    from .test_eagle_head import Reference

    folder, spec = _eagle(tmp_path)
    llm = LLM(str(folder), **SETTINGS, **spec, speculative_num_steps=3, disable_radix_cache=True)
    proposals: list[tuple[list[int], list[int]]] = []
    propose = llm.proposer.propose  # type: ignore[union-attr]

    def recording(seqs: list[Any], rooms: list[int]) -> Any:
        drafts = propose(seqs, rooms)
        proposals.extend((list(s.token_ids), d) for s, d in zip(seqs, _on_host(drafts), strict=True) if d)
        return drafts

    llm.proposer.propose = recording  # type: ignore[union-attr,method-assign]
    llm.generate(PROMPTS[:3], PARAMS[:3])
    reference = Reference(tmp_path / "eagle-head", llm.model)
    target = make_runner(llm.model, num_pages=64, page_size=16)
    from tessera.engine.sequence import Sequence

    assert len(proposals) > 10
    for tokens, drafts in proposals[::3]:
        seq = Sequence(tokens[:-1], SamplingParams())
        target.run([(seq, len(tokens) - 1)])
        features = target.last_hidden.clone()  # the target's features at positions 0 .. n - 2
        target.free(seq)
        ids, want = torch.tensor(tokens[1:]), []
        for _ in drafts:
            hidden = _reference_hidden(reference, ids, features)
            want.append(int(llm.model.compute_logits(hidden[-1]).argmax()))
            ids = torch.cat((ids, torch.tensor(want[-1:])))
            features = torch.cat((features, hidden[-1:]))
        assert drafts == want


def _on_host(drafts: list[list[int]] | DeviceDrafts) -> list[list[int]]:
    return drafts.on_host() if isinstance(drafts, DeviceDrafts) else drafts


@torch.no_grad()
def _reference_hidden(ref: Any, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """The head's hidden states (before the lm_head) of rows at positions 0.., densely."""
    x = ref.fc(torch.cat((ref.target.model.embed_tokens(ids), feature), dim=-1))[None]
    positions = torch.arange(len(ids))[None]
    causal = torch.full((len(ids), len(ids)), float("-inf")).triu(1)[None, None]
    out = ref.layer(
        x, attention_mask=causal, position_ids=positions, position_embeddings=ref.rotary(x, positions)
    )
    return out[0]


def test_eagle_gathers_first_drafts_from_several_observe_forwards_in_request_order() -> None:
    """Requests last observed in different steps: their first drafts and features come back in the
    order asked for, whole when one forward holds exactly them."""
    from types import SimpleNamespace

    from tessera.engine.speculative.eagle import EagleProposer, _Next, _Observed

    proposer = EagleProposer(SimpleNamespace(device=torch.device("cpu")))  # type: ignore[arg-type]
    old = _Observed(torch.tensor([10, 11, 12]), torch.arange(6.0).view(3, 2))
    new = _Observed(torch.tensor([20, 21]), 10 + torch.arange(4.0).view(2, 2))
    nexts = [_Next(5, new, 1), _Next(5, old, 2), _Next(5, new, 0), _Next(5, old, 0)]
    tokens, feats = proposer._gather(nexts)
    assert tokens.tolist() == [21, 12, 20, 10]
    assert feats.tolist() == [[12.0, 13.0], [4.0, 5.0], [10.0, 11.0], [0.0, 1.0]]
    tokens, _ = proposer._gather([_Next(5, new, 0), _Next(5, new, 1)])
    assert tokens is new.tokens
    tokens, feats = proposer._gather([_Next(5, old, 1)])
    assert tokens.tolist() == [11] and feats.tolist() == [[2.0, 3.0]]


def test_drafts_left_on_the_device_come_back_request_by_request() -> None:
    """A chain's tokens, step by step over the requests still drafting, laid out request by request;
    untouched where they are in that order already."""
    from tessera.engine.speculative.chain import request_major

    steps = [torch.tensor([10, 20, 30]), torch.tensor([11, 31]), torch.tensor([32])]
    drafts = request_major(steps, [[0, 1, 2], [0, 2], [2]], 4)
    assert drafts.counts == [2, 1, 3, 0]
    assert drafts.on_host() == [[10, 11], [20], [30, 31, 32], []]
    one = torch.tensor([5, 6, 7])
    assert request_major([one], [[0, 1, 2]], 3).tokens is one


def test_eagle_drafts_next_from_the_last_row_the_verify_keeps() -> None:
    """The head's row each request drafts from, picked on the device before the verify's tokens reach
    the host: a verify's first row plus its accepted drafts (those equal to the target's choice at the
    row before, up to the first that is not), a plain decode's or prefill end's last row."""
    from types import SimpleNamespace

    from tessera.engine.speculative.eagle import _kept_rows

    # rows: a prefill chunk ending at 3 (samples), a verify of 3 drafts at 4..7, a decode at 8, a verify
    # of 2 drafts at 9..11, a verify of 3 drafts at 12..15
    ids = torch.tensor([5, 6, 7, 8, 30, 31, 32, 33, 40, 50, 51, 52, 60, 61, 62, 63])
    forward = SimpleNamespace(
        host_logits=np.array([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]), input_ids=ids
    )
    batch = SimpleNamespace(logits_rows=[1, 4, 1, 3, 4])
    # the target's choice at each logits row: the first verify agrees with drafts 31 and 32, not 33; the
    # second with both; the third with none
    choices = torch.tensor([9, 31, 32, 99, 98, 41, 51, 52, 53, 0, 62, 63, 64])
    # (indices into the logits rows: the requests' first are 0, 1, 5, 6, 9)
    assert _kept_rows(batch, forward, choices).tolist() == [0, 1 + 2, 5, 6 + 2, 9]  # type: ignore[arg-type]
    # no verify at all: each request's one row
    plain = SimpleNamespace(host_logits=np.array([2, 5]), input_ids=ids)
    kept = _kept_rows(SimpleNamespace(logits_rows=[1, 1]), plain, torch.tensor([1, 2]))  # type: ignore[arg-type]
    assert kept.tolist() == [0, 1]


@needs_triton_on_cpu
def test_eagle_through_full_graphs_keeps_greedy_output(tmp_path: Path) -> None:
    """Verifies and the head's forwards replay full graphs (Triton attention in its interpreter): the
    drafts fed from the device, the head's features, the logits rows and page tables staged by the
    replays (which upload nothing of their batches). An echoing head, so drafts are accepted too. The
    reference is plain decoding with torch's attention, eagerly (the interpreter is slow): equal but
    where a near tie rounds the other way."""
    folder, spec = _eagle(tmp_path, echo=True)
    params = [SamplingParams(max_tokens=10, ignore_eos=True, top_logprobs=2)]
    with LLM(str(folder), device="cpu", load_format="dummy") as llm:
        want = llm.generate(PROMPTS[1:2], params)
    full = {"device": "cpu", "load_format": "dummy", "attention_backend": "triton",
            "emulate_graphs_on_cpu": True, "piecewise_cuda_graph_tokens": (4, 16), "cuda_graph_max_bs": 1,
            "extend_cuda_graph_max_tokens": 4, "extend_cuda_graph_max_seqs": 1}  # fmt: skip
    with LLM(str(folder), **full, **spec, speculative_num_steps=1) as llm:
        got = llm.generate(PROMPTS[1:2], params)
        _no_leak(llm)
        stats, head = llm.stats(), llm.proposer.runner.graph_stats()  # type: ignore[union-attr]
    assert_greedy_close(got, want)
    assert stats["spec_accepted"][1] > 0, stats["spec_accepted"]
    for graphs in (stats["graphs"], head):  # the verifies, and the head's forwards over their rows
        assert sum(graphs["replays"].get("full-extend", {}).values()) > 0, graphs
        assert not graphs["eager_fallbacks"], graphs
