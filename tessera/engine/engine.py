"""The engine: a model, its runner and a scheduler. Requests are added, `step()` runs one forward of
continuous batching (chunked prefills mixed with decodes under a token budget, prefixes shared, preemption
when KV pages run out) and samples, and finished requests become `RequestOutput`s. The offline `LLM` and
the server both drive it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tessera.engine.config import RunnerConfig
from tessera.engine.detokenize import IncrementalDetokenizer, output_text
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sampling import SamplingParams, sample_batch
from tessera.engine.scheduler import Scheduler, SchedulerConfig
from tessera.engine.sequence import Sequence
from tessera.models import registry

logger = logging.getLogger("tessera")


@dataclass
class RequestOutput:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or string) or "length"
    logprobs: list[float] | None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Engine:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | None = None,
        device: str | None = None,
        config: RunnerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        mem_fraction: float = 0.8,
        cpu_kv_tokens: int = 8192,
        load_format: str = "auto",
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = config or RunnerConfig()
        if self.device.type == "cpu" and not self.config.emulate_graphs_on_cpu:
            logger.warning("no GPU: running eagerly on the CPU (piecewise CUDA graphs need a GPU)")
        torch_dtype = (
            getattr(torch, dtype)
            if dtype
            else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        self.model, self.tokenizer, self.cfg = registry.load(model, torch_dtype, self.device, load_format)
        self.page_size = self.config.page_size
        pages = self._num_pages(torch_dtype, mem_fraction, cpu_kv_tokens)
        self.scheduler_config = scheduler or SchedulerConfig(
            chunked_prefill_size=self.config.chunked_prefill_size
        )
        if self.config.cuda_graph_max_bs > self.scheduler_config.max_running_requests:
            # no decode batch can be larger than the running limit: capturing beyond it wastes start-up
            self.config = replace(self.config, cuda_graph_max_bs=self.scheduler_config.max_running_requests)
        self.runner = ModelRunner(self.model, self.cfg, num_pages=pages, config=self.config)
        self.scheduler = Scheduler(self.runner.pool, self.page_size, self.scheduler_config)
        # Host seconds of every step, by phase: schedule; forward (building the batch and launching
        # its work, asynchronous on a GPU); sample (which waits for the GPU to finish); update.
        self.steps = 0
        self.step_seconds = dict.fromkeys(("schedule", "forward", "sample", "update"), 0.0)

    def _num_pages(self, dtype: torch.dtype, mem_fraction: float, cpu_kv_tokens: int) -> int:
        """KV pages: a fraction of the GPU memory still free after loading, or a fixed budget on CPU."""
        if not 0 < mem_fraction < 1:
            raise ValueError(f"mem_fraction must be in (0, 1), got {mem_fraction}")
        cfg = self.cfg
        per_token = cfg.num_kv_heads * (cfg.head_dim + cfg.v_head_dim)  # K and V (MLA: the latent alone)
        page_bytes = cfg.num_layers * self.page_size * per_token * dtype.itemsize
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            pages = int(free * mem_fraction) // page_bytes
        else:
            pages = -(-cpu_kv_tokens // self.page_size)
        logger.info(
            "KV cache: %d pages of %d tokens (%.0f MiB)", pages, self.page_size, pages * page_bytes / 2**20
        )
        return max(pages, 2)

    def add(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request (raises ValueError if it can never fit)."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        limit = self.cfg.max_position_embeddings
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
        """One forward; returns the sequences that got a new token (finished ones are released)."""
        clock, seconds = time.perf_counter, self.step_seconds
        t0 = clock()
        work = self.scheduler.schedule()
        if not work:
            raise RuntimeError("the scheduler found nothing it could run (KV cache too small?)")
        t1 = clock()
        logits = self.runner.run(work)
        t2 = clock()
        self.steps += 1
        seconds["schedule"] += t1 - t0
        seconds["forward"] += t2 - t1
        # a sequence whose whole tail ran gets a new token; a chunk of a longer prompt does not
        rows = [i for i, (seq, _) in enumerate(work) if seq.uncached == 0]
        if not rows:
            return []
        advanced = [work[i][0] for i in rows]
        if len(rows) < len(work):
            logits = logits[torch.tensor(rows, device=logits.device)]
        histories = [(s.prompt_token_ids, s.output_token_ids) for s in advanced]
        banned = [self._banned(s) for s in advanced]
        tokens, logprobs = sample_batch(
            logits, [s.params for s in advanced], [s.generator for s in advanced], histories, banned
        )
        t3 = clock()
        for seq, token, logprob in zip(advanced, tokens, logprobs, strict=True):
            self._append(seq, token, logprob)
            if seq.finished:
                self.scheduler.finish(seq)
        seconds["sample"] += t3 - t2
        seconds["update"] += clock() - t3
        return advanced

    def graph_stats(self) -> dict[str, object]:
        """Graph runtime counters of this engine: replays by size, eager fallbacks by reason, tokens."""
        return self.runner.graph_stats()

    def _banned(self, seq: Sequence) -> tuple[int, ...]:
        """Tokens `seq` may not sample now: its EOS and stop tokens until it has `min_tokens`."""
        p = seq.params
        if len(seq.output_token_ids) >= p.min_tokens:
            return ()
        return p.stop_token_ids + (() if p.ignore_eos else tuple(self.cfg.eos_token_ids))

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.output_token_ids.append(token)
        seq.output_logprobs.append(logprob)
        p = seq.params
        eos = token in self.cfg.eos_token_ids and not p.ignore_eos
        if eos or token in p.stop_token_ids or self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.cfg.max_position_embeddings:
            seq.finish_reason = "length"

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # NOTE: incremental: decoding the whole output on every step made this O(length) a step for
        # each request with stop strings (60 µs at 1,024 tokens), on the engine loop between forwards
        if not seq.params.stop:
            return False
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params, self.cfg.eos_token_ids)
        return seq.detokenizer.hits_stop(seq.output_token_ids)

    def text_so_far(self, seq: Sequence) -> str:
        return output_text(self.tokenizer, seq.output_token_ids, seq.params, self.cfg.eos_token_ids)

    def output(self, prompt: str, seq: Sequence) -> RequestOutput:
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and ids[-1] in self.cfg.eos_token_ids:
            ids = ids[:-1]  # EOS ends the text; it is not part of it
        return RequestOutput(
            prompt=prompt,
            text=self.text_so_far(seq),
            token_ids=ids,
            prompt_token_ids=seq.prompt_token_ids,
            finish_reason=seq.finish_reason or "length",
            logprobs=seq.output_logprobs[: len(ids)] if seq.params.logprobs else None,
            num_cached_tokens=seq.cached_prompt_tokens or 0,
        )


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
