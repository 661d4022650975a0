"""`tessera.LLM`: offline batched generation. Requests are admitted in waves that fit the KV cache;
a wave runs its prompts' prefill (chunked to a token budget), then decode steps until all finish."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.engine.config import RunnerConfig
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sampling import SamplingParams, sample
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


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | None = None,
        device: str | None = None,
        config: RunnerConfig | None = None,
        mem_fraction: float = 0.8,
        cpu_kv_tokens: int = 8192,
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
        self.model, self.tokenizer, self.cfg = registry.load(model, torch_dtype, self.device)
        self.max_batch_tokens = self.config.chunked_prefill_size
        self.page_size = self.config.page_size
        pages = self._num_pages(torch_dtype, mem_fraction, cpu_kv_tokens)
        self.runner = ModelRunner(self.model, self.cfg, num_pages=pages, config=self.config)

    def _num_pages(self, dtype: torch.dtype, mem_fraction: float, cpu_kv_tokens: int) -> int:
        """KV pages: a fraction of the GPU memory still free after loading, or a fixed budget on CPU."""
        if not 0 < mem_fraction < 1:
            raise ValueError(f"mem_fraction must be in (0, 1), got {mem_fraction}")
        cfg = self.cfg
        page_bytes = 2 * cfg.num_layers * self.page_size * cfg.kv_size * dtype.itemsize
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            pages = int(free * mem_fraction) // page_bytes
        else:
            pages = -(-cpu_kv_tokens // self.page_size)
        logger.info(
            "KV cache: %d pages of %d tokens (%.0f MiB)", pages, self.page_size, pages * page_bytes / 2**20
        )
        return max(pages, 2)

    def generate(
        self, prompts: str | list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [Sequence(self._encode(p), sp) for p, sp in zip(prompts, params, strict=True)]
        for wave in self._waves(seqs):
            try:
                self._run(wave)
            finally:
                for seq in wave:
                    self.runner.free(seq)
        return [self._output(p, s) for p, s in zip(prompts, seqs, strict=True)]

    def graph_stats(self) -> dict[str, object]:
        """Graph runtime counters of this engine: replays by size, eager fallbacks by reason, tokens."""
        return self.runner.graph_stats()

    def _pages(self, seq: Sequence) -> int:
        return -(-(len(seq.prompt_token_ids) + seq.params.max_tokens) // self.page_size)

    def _waves(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Consecutive groups of requests whose prompts and outputs fit the KV cache together."""
        capacity = self.runner.pool.num_free
        waves: list[list[Sequence]] = []
        used = capacity
        for seq in seqs:
            need = self._pages(seq)
            if need > capacity:
                raise ValueError(
                    f"a request needs {need * self.page_size} KV tokens (prompt + max_tokens); "
                    f"the cache holds {capacity * self.page_size}"
                )
            if used + need > capacity:
                waves.append([])
                used = 0
            waves[-1].append(seq)
            used += need
        return waves

    def _run(self, seqs: list[Sequence]) -> None:
        generators = [_generator(s.params.seed, self.device) for s in seqs]
        self._prefill(self.runner, seqs, generators)
        while running := [(s, g) for s, g in zip(seqs, generators, strict=True) if not s.finished]:
            logits = self.runner.run([(s, 1) for s, _ in running])
            for (seq, gen), row in zip(running, logits, strict=True):
                self._append(seq, row, gen)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate(self.tokenizer.apply_chat_template(messages), params)[0]

    def _encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("empty prompt")
        limit = self.cfg.max_position_embeddings
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
        return ids

    def _prefill(self, runner: ModelRunner, seqs: list[Sequence], generators: list) -> None:
        """All prompts, in chunks of at most `max_batch_tokens` tokens; a sequence whose prompt is
        done gets its first token sampled."""
        pending = list(zip(seqs, generators, strict=True))
        while pending:
            work, budget = [], self.max_batch_tokens
            for seq, _ in pending:
                n = min(len(seq.prompt_token_ids) - seq.num_cached, budget)
                if n == 0:
                    break
                work.append((seq, n))
                budget -= n
            logits = runner.run(work)
            for (seq, _), row in zip(work, logits, strict=True):
                if seq.num_cached == len(seq.prompt_token_ids):
                    self._append(seq, row, dict(pending)[seq])
            pending = [(s, g) for s, g in pending if s.num_cached < len(s.prompt_token_ids)]

    def _append(self, seq: Sequence, logits: torch.Tensor, gen: torch.Generator | None) -> None:
        token, logprob = sample(logits, seq.params, gen)
        seq.output_token_ids.append(token)
        seq.output_logprobs.append(logprob)
        p = seq.params
        eos = token in self.cfg.eos_token_ids and not p.ignore_eos
        if eos or token in p.stop_token_ids or self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.cfg.max_position_embeddings:
            seq.finish_reason = "length"

    def _hit_stop_string(self, seq: Sequence) -> bool:
        stops = seq.params.stop
        return bool(stops) and any(s in self.tokenizer.decode(seq.output_token_ids) for s in stops)

    def _output(self, prompt: str, seq: Sequence) -> RequestOutput:
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and ids[-1] in self.cfg.eos_token_ids:
            ids = ids[:-1]  # EOS ends the text; it is not part of it
        text = self.tokenizer.decode(ids)
        for stop in seq.params.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return RequestOutput(
            prompt=prompt,
            text=text,
            token_ids=ids,
            prompt_token_ids=seq.prompt_token_ids,
            finish_reason=seq.finish_reason or "length",
            logprobs=seq.output_logprobs[: len(ids)] if seq.params.logprobs else None,
        )


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
