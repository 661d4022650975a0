"""Full graphs for small extend and mixed batches (engine/graph_inputs.py over graphs/full.py), on the
emulated backend: the same static buffers, fixed-grid attention and padding as on a GPU, against an
eager runner."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.engine.graph_inputs import full_graph_descriptors
from tessera.engine.speculative import DRAFT_PLACEHOLDER
from tessera.graphs import BatchDescriptor, GraphMode, PaddingLeakError

from .conftest import needs_triton_on_cpu
from .runner_driver import make_runner
from .test_llama import _runner, _seq, hf_and_ours

FULL = GraphMode.FULL


def test_descriptors_leave_a_row_for_the_padding_and_share_the_token_counts() -> None:
    descriptors = full_graph_descriptors(4, [16, 4, 8], 8)
    decode = [BatchDescriptor(FULL, b, b, uniform_decode=True) for b in (1, 2, 4)]
    assert [d for d in descriptors if d.uniform_decode] == decode
    assert [d for d in descriptors if not d.uniform_decode] == [
        BatchDescriptor(FULL, 4, 5),
        BatchDescriptor(FULL, 8, 9),
        BatchDescriptor(FULL, 16, 9),
    ]
    assert [d.kind for d in descriptors[2:4]] == ["full-decode", "full-extend"]
    assert full_graph_descriptors(0, [], 1) == []
    with pytest.raises(ValueError, match="at least one sequence"):
        full_graph_descriptors(4, [8], 0)


def test_verify_batches_past_the_extend_graphs_seqs_get_graphs_of_their_own() -> None:
    """Speculative decoding (K = 3): a verify of 16 or 32 requests (4 tokens each) has too many sequences
    for the extend graphs' 8 rows; graphs of 16 x 4 and 32 x 4 tokens with a row each take them."""
    descriptors = full_graph_descriptors(32, [8, 16, 32, 64, 128], 8, verify_len=4)
    extend = [(d.num_tokens, d.num_seqs) for d in descriptors if not d.uniform_decode]
    assert extend == [(8, 9), (16, 9), (32, 9), (64, 9), (64, 17), (128, 9), (128, 33)]
    assert full_graph_descriptors(32, [8], 8, verify_len=4) == full_graph_descriptors(32, [8], 8)


@needs_triton_on_cpu
@pytest.mark.parametrize("family", ["LlamaForCausalLM", "Qwen3MoeForCausalLM"])
def test_extend_graphs_match_eager(family: str) -> None:
    """Prefills, a prefix-cached extend, a mixed batch, a batch filling its graph exactly (no padding
    row) and one of too many sequences (piecewise instead), each against eager. The MoE family's padded
    rows are masked from routing by the device count of real rows the replay writes."""
    _, ours = hf_and_ours(family)
    reference = copy.deepcopy(ours)
    graphs = make_runner(ours, num_pages=48, page_size=4, attention_backend="triton",
                         emulate_graphs_on_cpu=True, cuda_graph_max_bs=2, piecewise_cuda_graph_tokens=(8, 16),
                         extend_cuda_graph_max_tokens=16, extend_cuda_graph_max_seqs=2)  # fmt: skip
    assert graphs.graph_inputs is not None
    assert [d.num_tokens for d in graphs.graph_inputs.extend] == [8, 16]
    eager = _runner(reference, "torch", num_pages=48)  # the interpreter once is enough
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (16, 5, 9, 3, 2, 4)]
    runs = {name: [_seq(p) for p in prompts] for name in ("graphs", "eager")}
    logits: dict[str, list[torch.Tensor]] = {"graphs": [], "eager": []}
    for name, runner in (("graphs", graphs), ("eager", eager)):
        a, b, c, d, e, f = runs[name]
        steps = [
            [(a, 16)],  # exactly 16 tokens: no padding row needed
            # 3 tokens padded to 8: one padding sequence, whose K/V must go to the dummy slot and not
            # to the rows of a's slots the last replay left in the slot mapping
            [(b, 3)],
            [(b, 2), (c, 9)],  # b's last 2 over its cached 3, and a 9-token prefill: 11 padded to 16
            [(d, 3), (e, 2), (f, 4)],  # 3 sequences > 2: the piecewise graphs
        ]
        for work in steps:
            logits[name].append(runner.run(work))
        a.output_token_ids.append(11)
        b.output_token_ids.append(12)
        logits[name].append(runner.run([(a, 1), (b, 1)]))  # decode of 2: a decode graph, over a's cache
    for got, ref in zip(logits["graphs"], logits["eager"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    stats = graphs.graph_stats()
    assert stats["replays"] == {
        "full-extend": {"16": 2, "8": 1},
        "full-decode": {"2": 1},
        "piecewise": {"16": 1},  # the batch of three sequences (9 tokens) through the pieces
    }


@needs_triton_on_cpu
def test_poisoned_padding_catches_an_op_that_mixes_rows() -> None:
    """Debug mode: each padded replay is repeated with the padded rows' inputs shuffled; a model whose
    output mixes rows (a mean over all of them, padding included) must be caught, a real one must not."""
    _, ours = hf_and_ours("LlamaForCausalLM")
    runner = make_runner(ours, num_pages=16, page_size=4, attention_backend="triton",
                         emulate_graphs_on_cpu=True, disable_piecewise_cuda_graph=True, cuda_graph_max_bs=2,
                         piecewise_cuda_graph_tokens=(8,), extend_cuda_graph_max_seqs=2,
                         debug_poison_padding=True)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (5,), generator=gen).tolist()
    runner.run([(_seq(prompt), 5)])  # 5 tokens padded to 8: clean
    forward = ours.forward
    ours.forward = lambda ids, pos: (h := forward(ids, pos)) + h.mean(0, keepdim=True)  # type: ignore[method-assign]
    with pytest.raises(PaddingLeakError, match=r"full graph .*num_tokens=8, num_seqs=3"):
        runner.run([(_seq(prompt), 5)])


@needs_triton_on_cpu
def test_token_ids_fed_from_the_device_replace_the_hosts_in_full_graphs() -> None:
    """A draft chain's or a verify's batch carries placeholder ids on the host and the real ones on the
    device (`ForwardBatch.feed_ids`, `feed_at`): through a decode graph and an extend graph it gives the
    logits of the same batch with the ids on the host, and a smaller batch after it in the same graph
    pads over the rows that held its placeholders with valid token ids."""
    _, ours = hf_and_ours("LlamaForCausalLM")
    runner = make_runner(ours, num_pages=32, page_size=4, attention_backend="triton",
                         emulate_graphs_on_cpu=True, cuda_graph_max_bs=2, piecewise_cuda_graph_tokens=(8,),
                         extend_cuda_graph_max_tokens=8, extend_cuda_graph_max_seqs=2)  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    a, b = (_seq(torch.randint(0, 256, (n,), generator=gen).tolist()) for n in (6, 3))
    runner.run([(a, 6), (b, 3)])  # their prompts cached; next, extends of 4 + 1 and 2 + 1, and a decode
    a.output_token_ids += [17, 23, 31, 37]
    b.output_token_ids += [29]
    for work in ([(a, 4), (b, 1)], [(a, 2), (b, 1)], [(a, 1), (b, 1)]):
        batch = runner.batch(work)
        want = runner.runner.forward(batch)
        assert not batch.uploaded  # the replay staged its host arrays alone
        ids = batch.input_ids.clone()
        batch.input_ids.fill_(DRAFT_PLACEHOLDER)  # the batch's device copy of the host's ids: not read
        if work[0][1] == 2:  # some rows alone, as a verify's drafts are: the host holds the others
            rows = np.array([1, 2], dtype=np.int64)
            batch.host[rows] = DRAFT_PLACEHOLDER
            batch.feed_at(rows, ids[rows])
        else:
            batch.host[: ids.shape[0]] = DRAFT_PLACEHOLDER
            batch.feed_ids(ids)
        got = runner.runner.forward(batch)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with pytest.raises(ValueError, match="token ids for a batch"):
            batch.feed_ids(ids[:1])
    stats = runner.graph_stats()["replays"]
    assert stats["full-extend"] == {"8": 4} and stats["full-decode"] == {"2": 2}, stats


@needs_triton_on_cpu
def test_an_eagle_heads_features_are_staged_into_its_full_graphs(tmp_path: Path) -> None:
    """A model with a third input (an EAGLE head's features) replays extend and decode graphs that read
    each batch's features: its logits equal an eager runner's, and other features give other logits."""
    from tessera.loader.eagle import load_eagle_head
    from tessera.testing.eagle_checkpoint import save_random_eagle_head

    _, target = hf_and_ours("LlamaForCausalLM")
    save_random_eagle_head(tmp_path, target.config, seed=4)
    head = load_eagle_head(tmp_path, target, torch.float32, "cpu")
    graphs = make_runner(head, num_pages=32, page_size=4, attention_backend="triton",
                         emulate_graphs_on_cpu=True, cuda_graph_max_bs=2, piecewise_cuda_graph_tokens=(8,),
                         extend_cuda_graph_max_tokens=8, extend_cuda_graph_max_seqs=2)  # fmt: skip
    eager = make_runner(head, num_pages=32, page_size=4, attention_backend="triton")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (4, 3)]
    hidden = target.config.hidden_size
    features = [torch.randn(n, hidden, generator=gen) for n in (7, 2)]  # an extend of 4 + 3, a decode of 2
    logits: dict[str, list[torch.Tensor]] = {}
    for name, runner in (("graphs", graphs), ("eager", eager)):
        a, b = (_seq(p) for p in prompts)
        logits[name] = []
        for work, feats in zip(([(a, 4), (b, 3)], [(a, 1), (b, 1)]), features, strict=True):
            if work[0][1] == 1:
                a.output_token_ids.append(17)
                b.output_token_ids.append(29)
            batch = runner.batch(work)
            batch.features = feats
            logits[name].append(runner.runner.forward(batch))
            for seq, n in work:
                seq.num_cached += n
    for got, want in zip(logits["graphs"], logits["eager"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert graphs.graph_stats()["replays"] == {"full-extend": {"8": 1}, "full-decode": {"2": 1}}
    batch.features = features[1] + 1  # the decode again (same slots), other features
    assert not torch.allclose(graphs.runner.forward(batch), logits["graphs"][1], rtol=1e-2, atol=1e-2)
