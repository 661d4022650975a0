"""Tensor parallelism in the engine, on CPU over gloo: `LLM(..., tensor_parallel_size=2)` runs a worker
process beside the caller (rank 0) and gives the same greedy tokens as one rank, eagerly and through the
emulated graphs (with n-gram speculation's verify batches, and a draft model's or EAGLE head's forwards
on every rank); a worker that dies is named within the timeout; bad settings are refused up front;
close() leaves no worker process and no page behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tessera.cli import build_parser, engine_config
from tessera.engine import parallel, torchrun
from tessera.engine.batch import build_rows
from tessera.engine.config import EngineConfig
from tessera.engine.llm import LLM
from tessera.engine.parallel import WorkerError
from tessera.engine.sampling import SamplingParams
from tessera.engine.speculative import DeviceDrafts
from tessera.engine.torchrun import check_parallel
from tessera.graphs import BatchDescriptor, GraphMode
from tessera.server.engine_loop import AsyncEngine, Update

VOCAB = 512
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
          "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}  # fmt: skip
# one prompt longer than a prefill chunk, one that repeats itself (n-gram drafts match), one token
PROMPTS = [[(7 * i) % VOCAB for i in range(40)], [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9], [42]]
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)
BASE = {"device": "cpu", "load_format": "dummy", "chunked_prefill_size": 16, "dist_timeout": 20.0}
GRAPHS = {"emulate_graphs_on_cpu": True, "piecewise_cuda_graph_tokens": (8, 32)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a word-level tokenizer of its own (the default model's takes seconds to build)."""
    from tokenizers import Tokenizer, models

    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps(CONFIG))
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(
        str(path / "tokenizer.json")
    )
    return path


def _generate(folder: Path, **settings: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), **BASE, **settings)
    return [out.token_ids for out in llm.generate(PROMPTS, PARAMS)], llm


def _closed_cleanly(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["pages_free"] + stats["pages_evictable"] == stats["pages_usable"], stats
    assert llm.tp is not None
    pids = llm.tp.pids
    llm.close()
    llm.close()  # a second close does nothing
    assert not multiprocessing.active_children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # exited and reaped: no orphan, no zombie
            os.kill(pid, 0)


def test_two_ranks_give_the_tokens_of_one(folder: Path) -> None:
    want, _ = _generate(folder)
    got, llm = _generate(folder, tensor_parallel_size=2)
    assert got == want
    assert llm.tp is not None and llm.tp.steps == llm.steps > 3  # every forward went to the worker
    assert len(llm.tp.pids) == 1
    _closed_cleanly(llm)


@pytest.mark.parametrize("placement", ["inside", "split"])
def test_two_ranks_through_the_graphs_with_ngram_verifies(folder: Path, placement: str) -> None:
    """The all-reduces inside the graph pieces, or as graph boundaries (the worker is told too)."""
    want, _ = _generate(folder, **GRAPHS)
    got, llm = _generate(folder, **GRAPHS, tensor_parallel_size=2, speculative_algorithm="NGRAM",
                         all_reduce_placement=placement)  # fmt: skip
    assert got == want
    pieces = llm.runner.graphs.report.num_pieces  # split: each all-reduce is one more graph boundary
    assert (pieces > CONFIG["num_hidden_layers"] + 1) == (placement == "split"), pieces
    stats = llm.stats()
    assert sum(stats["spec_accepted"]) > 0  # verify batches ran (their logits rows sent to the worker)
    assert not stats["graphs"]["eager_fallbacks"] and stats["graphs"]["padded_tokens"] > 0
    _closed_cleanly(llm)


@pytest.mark.parametrize("drafter", ["first-layer", "eagle"])
def test_two_ranks_draft_with_a_model_on_both(folder: Path, drafter: str, tmp_path: Path) -> None:
    """A draft's forwards run on both ranks too (the target's first layer, or a random EAGLE head): the
    drafted token ids and the head's features reach the worker from rank 0's device. The tokens equal
    one rank's with the same drafts, and plain decoding's."""
    from tessera.testing.eagle_checkpoint import save_random_eagle_head

    spec: dict[str, Any] = {"speculative_algorithm": "STANDALONE", "speculative_draft_layers": 1}
    if drafter == "eagle":
        head = save_random_eagle_head(tmp_path, CONFIG)
        spec = {"speculative_algorithm": "EAGLE", "speculative_draft_model_path": str(head)}
    plain, _ = _generate(folder, **GRAPHS)
    runs = []
    for ranks in (1, 2):
        llm = LLM(str(folder), **BASE, **GRAPHS, **spec, speculative_num_steps=3, tensor_parallel_size=ranks)
        drafted: list[list[list[int]]] = []
        propose = llm.proposer.propose  # type: ignore[union-attr]

        def recording(
            seqs: list[Any], rooms: list[int], propose: Any = propose, drafted: Any = drafted
        ) -> Any:
            drafts = propose(seqs, rooms)
            drafted.append(drafts.on_host() if isinstance(drafts, DeviceDrafts) else drafts)
            return drafts

        llm.proposer.propose = recording  # type: ignore[union-attr,method-assign]
        runs.append(([o.token_ids for o in llm.generate(PROMPTS, PARAMS)], drafted, llm))
    (want, want_drafts, one), (got, got_drafts, llm) = runs
    assert got == want == plain
    # the same drafts: the worker's half of each draft forward saw the same ids and features
    assert got_drafts == want_drafts and any(d for step in got_drafts for d in step)
    assert llm.tp is not None and llm.tp.steps > llm.steps  # the draft's forwards went to the worker too
    assert llm.stats()["spec_accepted"] == one.stats()["spec_accepted"]
    _closed_cleanly(llm)


@pytest.mark.parametrize("runner", ["target", "draft"])
def test_a_worker_killed_mid_run_is_named_within_the_timeout(folder: Path, runner: str) -> None:
    """Killed before the target's third forward, or a first-layer draft's (inside drafting)."""
    spec = {"speculative_algorithm": "STANDALONE", "speculative_draft_layers": 1} if runner == "draft" else {}
    llm = LLM(str(folder), **BASE, **spec, tensor_parallel_size=2)
    assert llm.tp is not None
    killed = llm.runner if runner == "target" else llm.draft_runner
    assert killed is not None
    publish, forwards = killed.on_forward, []
    assert publish is not None

    def kill_on_the_third(batch: Any, d: BatchDescriptor) -> None:
        forwards.append(d)
        if len(forwards) == 3:
            os.kill(llm.tp.pids[0], signal.SIGKILL)  # type: ignore[union-attr]
        publish(batch, d)

    killed.on_forward = kill_on_the_third
    start = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 died: killed by SIGKILL") as raised:
        llm.generate(PROMPTS, PARAMS)
    assert time.monotonic() - start < BASE["dist_timeout"] and raised.value.rank == 1
    with pytest.raises(WorkerError, match="rank 1"):  # and so does every later step
        llm.generate(PROMPTS[:1], PARAMS)
    _closed_cleanly(llm)


def test_rank_0_failing_inside_a_forward_ends_the_ranks_at_once(folder: Path) -> None:
    """The worker waits in that forward's collectives, and a later forward's would pair with them: the
    engine ends the workers and every later step raises, rather than hanging or serving out of step."""
    llm = LLM(str(folder), **BASE, tensor_parallel_size=2)
    assert llm.tp is not None
    layer = llm.model.model.layers[1]
    forward, calls = layer.forward, []

    def fail_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return forward(*args)

    layer.forward = fail_once
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 0 failed inside a forward .* illegal memory access"):
        llm.generate(PROMPTS, PARAMS)
    assert time.monotonic() - start < BASE["dist_timeout"] / 2
    with pytest.raises(WorkerError, match="rank 0 failed inside a forward"):  # and so does every later step
        llm.generate(PROMPTS[:1], PARAMS)
    _closed_cleanly(llm)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker through /proc")
def test_the_server_engine_exits_when_a_worker_dies(folder: Path) -> None:
    # NOTE: the server's engine process is daemonic: it spawns its worker all the same
    engine = AsyncEngine.start(EngineConfig.create(str(folder), **BASE, tensor_parallel_size=2))
    died = threading.Event()
    engine.on_death(died.set)

    async def one() -> Update:
        handle = await engine.submit(PROMPTS[0], PARAMS)
        while (update := await handle.next()).finish_reason is None:
            pass
        return update

    try:
        (worker,) = _children(engine._proc.pid)
        assert asyncio.run(one()).token_ids
        os.kill(worker, signal.SIGKILL)
        assert asyncio.run(one()).finish_reason == "error"
        assert died.wait(BASE["dist_timeout"]) and engine.exit_code == 1  # `tessera serve` exits 1 then
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tensor_parallel_size": 0}, r"tensor_parallel_size \(--tp\) must be >= 1"),
        (
            {"tensor_parallel_size": 2, "expert_parallel_size": 3},
            r"--ep\) must be 1 or the tensor parallel size 2",
        ),
        ({"expert_parallel_size": 2}, "must be 1 or the tensor parallel size 1"),
        ({"dist_timeout": 0}, "dist_timeout"),
    ],
)
def test_bad_parallel_settings_are_refused_up_front(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig.create(**settings)


def test_more_ranks_than_gpus_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_parallel(EngineConfig.create(device="cuda", tensor_parallel_size=2))
    with pytest.raises(ValueError, match=r"--tp 4 needs 4 GPUs .* 2 are visible"):
        check_parallel(EngineConfig.create(device="cuda", tensor_parallel_size=4))
    with pytest.raises(ValueError, match="rank r runs on GPU r"):
        check_parallel(EngineConfig.create(device="cuda:1", tensor_parallel_size=2))


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_cli_takes_tp_and_ep(command: str) -> None:
    prompt = ["--prompt", "x"] if command == "generate" else []
    for tp, ep in (
        ("--tp", "--ep"),
        ("--tensor-parallel-size", "--expert-parallel-size"),
        ("--tp-size", "--ep-size"),
    ):
        args = build_parser().parse_args([command, *prompt, tp, "2", ep, "2", "--dist-timeout", "5"])
        config = engine_config(args)
        assert (config.tensor_parallel_size, config.expert_parallel_size, config.dist_timeout) == (2, 2, 5.0)


def test_torchrun_sets_the_tp_size_from_its_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert torchrun.torchrun_rank() == 1
    assert torchrun.torchrun_config(EngineConfig()).tensor_parallel_size == 2
    with pytest.raises(ValueError, match="--tp 4, but torchrun started 2 ranks"):
        torchrun.torchrun_config(EngineConfig.create(tensor_parallel_size=4))
    with pytest.raises(RuntimeError, match=r"ranks > 0 call .*serve_torchrun_worker"):
        LLM(tensor_parallel_size=2)
    # the CLI's flags: `--ep 2` alone, its TP size the world's (the config checks ep against tp)
    config = engine_config(build_parser().parse_args(["generate", "--prompt", "hi", "--ep", "2"]))
    assert (config.tensor_parallel_size, config.expert_parallel_size) == (2, 2)


def test_a_step_message_carries_the_whole_forward() -> None:
    rows = [([5, 6, 7], 16, [3, 4]), ([9], 4, [2]), (list(range(20)), 0, [5, 6])]
    batch = build_rows(rows, 16, torch.device("cpu"))
    batch.select_logits(np.array([2, 3], dtype=np.int64))
    d = BatchDescriptor(GraphMode.FULL, 32, 4, False)
    message = parallel.pack(batch, d)
    got, got_d = parallel.unpack(message[: parallel.HEADER], message[parallel.HEADER :], torch.device("cpu"))
    assert got_d == d
    np.testing.assert_array_equal(got.host, batch.host)
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(got, name), getattr(batch, name)), name
    assert torch.equal(got.metadata.slot_mapping, batch.metadata.slot_mapping)
    for name in ("page_table", "q_start", "q_len", "ctx_len", "max_q_len"):
        assert torch.equal(torch.as_tensor(getattr(got.metadata.kernel, name)),
                           torch.as_tensor(getattr(batch.metadata.kernel, name))), name  # fmt: skip
    assert got.metadata.seqs == batch.metadata.seqs
