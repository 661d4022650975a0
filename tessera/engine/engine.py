"""The engine: a model, its runner and a scheduler. Requests are added, `step()` runs one forward of
continuous batching (chunked prefills mixed with decodes under a token budget, prefixes shared, preemption
when KV pages run out) and samples, and finished requests become `RequestOutput`s. The offline `LLM` and
the server both drive it."""

from __future__ import annotations

import functools
import gc
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from tessera.distributed import set_all_reduce_placement
from tessera.engine.batch import ScheduledBatch
from tessera.engine.config import EngineConfig
from tessera.engine.detokenize import output_text
from tessera.engine.kv_manager import KVManager
from tessera.engine.model_runner import ModelRunner, num_kv_pages
from tessera.engine.parallel import TensorParallel, WorkerError
from tessera.engine.sampling import SamplingParams, TopLogprobs, sample_batch
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import Proposer
from tessera.engine.speculative.build import cached_models, draft_runner, load_draft
from tessera.engine.speculative.verify import verify_batch
from tessera.engine.stopping import StopChecker
from tessera.loader.model_loader import load_model
from tessera.model_config import ModelConfig

logger = logging.getLogger("tessera")
T = TypeVar("T")
STEP_PHASES = ("schedule", "propose", "forward", "sample", "update")


@dataclass
class RequestOutput:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or string) or "length"
    logprobs: list[float] | None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    top_logprobs: list[TopLogprobs] | None = None  # each token's most likely alternatives, if asked


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.device = config.torch_device
        if self.device.type == "cpu" and not config.runner.emulate_graphs_on_cpu:
            logger.warning("no GPU: running eagerly on the CPU (piecewise CUDA graphs need a GPU)")
        # NOTE: the ranks join before the model is built: its layers read their slice from tp_rank()
        self.tp = TensorParallel.start(config)
        if self.tp is not None:  # an engine dropped or left open at exit still stops its workers
            weakref.finalize(self, self.tp.close)
        try:
            self._build(config)
        except BaseException as exc:
            if self.tp is None:
                raise
            error = self.tp.failure(exc)  # before close(), which ends the workers
            self.tp.close()
            if error is exc:
                raise
            raise error from exc

    def _build(self, config: EngineConfig) -> None:
        if self.device.type == "cuda":
            # NOTE: an engine dropped earlier in this process holds its weights and KV cache through
            # reference cycles until the collector runs, and the allocator's cache keeps what it frees
            gc.collect()
            torch.cuda.empty_cache()
        set_all_reduce_placement(config.all_reduce_placement)  # read by the layers as they are built
        self.model, self.tokenizer, self.model_config = load_model(
            config.model,
            config.torch_dtype,
            self.device,
            config.load_format,
            quantization=config.quantization,
        )
        if config.context_length is not None:
            self.model_config = _with_context_length(self.model_config, config.context_length)
        if config.chat_template is not None:
            self.tokenizer = self.tokenizer.with_chat_template(Path(config.chat_template).read_text())
        self.draft_model = load_draft(config, self.model, self.model_config.max_position_embeddings)
        pages = self._num_pages()
        self.runner = ModelRunner(self.model, config, num_pages=pages)
        # NOTE: built before the ranks are ready, as every rank builds it: its capture runs collectives
        self.draft_runner = draft_runner(config, self.draft_model, self.runner)
        if self.tp is not None:
            self.tp.ready(self.runner, self.draft_runner)
        kv = KVManager(pages, config.page_size, prefix_cache=not config.scheduler.disable_radix_cache)
        mc = self.model_config
        stops = StopChecker(self.tokenizer, mc.eos_token_ids, mc.max_position_embeddings)
        spec = config.speculative
        self.scheduler = Scheduler(config.scheduler, kv, stops, lookahead=spec.num_steps)
        self.proposer = self._proposer()
        # Host seconds of every step, by phase: schedule; propose (drafting: a model's draft forwards
        # are launched, not waited for); forward (building the batch and launching its work,
        # asynchronous on a GPU); sample (which waits for the GPU to finish); update.
        self.steps = 0
        self.step_seconds = dict.fromkeys(STEP_PHASES, 0.0)

    def _proposer(self) -> Proposer | None:
        spec = self.config.speculative
        if spec.algorithm == "NGRAM":
            from tessera.engine.speculative.ngram import NgramProposer

            return NgramProposer(
                spec.speculative_ngram_min_match_window_size, spec.speculative_ngram_max_match_window_size
            )
        runner = self.draft_runner
        if runner is None:
            return None
        if spec.algorithm == "EAGLE":
            from tessera.engine.speculative.eagle import EagleProposer

            return EagleProposer(runner)
        from tessera.engine.speculative.draft_model import DraftModelProposer

        return DraftModelProposer(runner, shares_target_cache=spec.speculative_draft_layers is not None)

    def _num_pages(self) -> int:
        """KV pages: a fraction of the GPU memory still free after loading, or a fixed budget on CPU; with
        tensor parallelism the least any rank has room for."""
        pages = num_kv_pages(
            self.config, cached_models(self.config, self.model, self.draft_model), self.device
        )
        return pages if self.tp is None else self.tp.agree_pages(pages)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit, and when the engine is collected)."""
        if self.tp is not None:
            self.tp.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request (raises ValueError if it can never fit)."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        limit = self.model_config.max_position_embeddings
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
        seq = Sequence(prompt_ids, params, generator=_generator(params.seed, self.device))
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> bool:
        return self.scheduler.abort(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Sequence]:
        """One forward: schedule → run → sample → postprocess. Returns the sequences that got a new
        token (finished ones are released)."""
        clock, seconds = time.perf_counter, self.step_seconds
        t0 = clock()
        batch = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("the scheduler found nothing it could run (KV cache too small?)")
        t1 = clock()
        proposer = self.proposer
        if proposer is not None and batch.draft_room:
            rooms = list(batch.draft_room.values())
            self.scheduler.attach_drafts(batch, self._on_ranks(proposer.propose, batch.proposal_seqs, rooms))
        t2 = clock()
        starts = [seq.num_cached for seq, _ in batch.work] if proposer is not None else []
        logits = self._run(batch)
        t3 = clock()
        # called with the target's choices on the device, before the host waits for them: an EAGLE head
        # queues its forward over the target's rows there
        follow = (
            None
            if proposer is None
            else functools.partial(self._on_ranks, proposer.follow, batch, self.runner)
        )
        if batch.verifies:
            stops = self.scheduler.stops
            verified = verify_batch(logits, batch.samplers, stops, batch.device_drafts, follow)
            t4 = clock()
            advanced = self.scheduler.postprocess_verified(batch, verified)
        else:
            tokens, logprobs, tops = self._sample(logits, batch.samplers, follow)
            t4 = clock()
            advanced = self.scheduler.postprocess(batch, tokens, logprobs, tops)
        if proposer is not None:  # a proposer keeps up with what the target kept
            self._on_ranks(proposer.observe, batch.work, starts, self.runner)
        self.steps += 1
        times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, clock() - t4)
        for phase, elapsed in zip(STEP_PHASES, times, strict=True):
            seconds[phase] += elapsed
        return advanced

    def _run(self, batch: ScheduledBatch) -> torch.Tensor:
        if self.tp is None:
            return self.runner.run(batch)
        tp = self.tp

        def run() -> torch.Tensor:
            logits = self.runner.run(batch)
            tp.wait_device()
            return logits

        return self._on_ranks(run)

    def _on_ranks(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)`, whose forwards every tensor-parallel rank runs: a rank that died or stopped
        answering meanwhile is named."""
        if self.tp is None:
            return work(*args)
        published = self.tp.steps
        try:
            return work(*args)
        except Exception as exc:
            error = self.tp.failure(exc)
            if not isinstance(error, WorkerError) and self.tp.steps > published:
                # NOTE: rank 0 failed inside a forward the workers run too: they wait in its collectives,
                # and a later forward's would pair with those (NCCL matches collectives by order alone)
                error = WorkerError([(0, f"failed inside a forward the other ranks ran: {error!r}")])
                self.tp.abandon(error)
            if error is exc:
                raise
            raise error from exc

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], before_copy: Callable[[torch.Tensor], None] | None
    ) -> tuple[list[int], list[float], list[TopLogprobs]]:
        if not seqs:
            if before_copy is not None:
                before_copy(logits.new_empty(0, dtype=torch.long))
            return [], [], []
        stops = self.scheduler.stops
        assert stops is not None
        histories = [(s.prompt_token_ids, s.output_token_ids) for s in seqs]
        banned = [stops.banned(s) for s in seqs]
        params, rngs = [s.params for s in seqs], [s.rng() for s in seqs]
        return sample_batch(logits, params, rngs, histories, banned, before_copy)

    def stats(self) -> dict[str, Any]:
        """What an operator watches: requests, KV pages, graph counters, step timings (the server's
        /metrics, and tests that look for leaked pages)."""
        s = self.scheduler
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            **s.kv.usage(),
            "preemptions": s.preemptions,
            "has_work": self.has_work,
            "graphs": self.runner.graph_stats(),
            "steps": self.steps,
            "step_seconds": dict(self.step_seconds),
            "spec_accepted": list(s.spec_accepted),
        }

    def info(self) -> dict[str, Any]:
        """What a front end needs once: the tokenizer and the model's EOS tokens."""
        return {"tokenizer": self.tokenizer, "eos_token_ids": tuple(self.model_config.eos_token_ids)}

    def text_so_far(self, seq: Sequence) -> str:
        return output_text(self.tokenizer, seq.output_token_ids, seq.params, self.model_config.eos_token_ids)

    def output(self, prompt: str, seq: Sequence) -> RequestOutput:
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and ids[-1] in self.model_config.eos_token_ids:
            ids = ids[:-1]  # EOS ends the text; it is not part of it
        return RequestOutput(
            prompt=prompt,
            text=self.text_so_far(seq),
            token_ids=ids,
            prompt_token_ids=seq.prompt_token_ids,
            finish_reason=seq.finish_reason or "length",
            logprobs=seq.output_logprobs[: len(ids)] if seq.params.logprobs else None,
            num_cached_tokens=seq.cached_prompt_tokens or 0,
            top_logprobs=seq.output_top_logprobs[: len(ids)] if seq.params.top_logprobs else None,
        )


def _with_context_length(mc: ModelConfig, n: int) -> ModelConfig:
    """`--context-length`: at most the model's own, which sized its rotary table and the runner's page
    table."""
    if n > mc.max_position_embeddings:
        raise ValueError(f"context length {n} exceeds the model's {mc.max_position_embeddings}")
    return replace(mc, max_position_embeddings=n)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device)  # seeded per position: Sequence.rng
