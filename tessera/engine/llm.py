"""`tessera.LLM`: offline batched generation. All requests run together: one prefill of every
prompt (chunked to a token budget), then decode steps over the running sequences."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

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
        max_batch_tokens: int = 2048,
        page_size: int = 16,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            logger.warning("no GPU: running eagerly on the CPU (piecewise CUDA graphs need a GPU)")
        torch_dtype = (
            getattr(torch, dtype)
            if dtype
            else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        self.model, self.tokenizer, self.cfg = registry.load(model, torch_dtype, self.device)
        self.max_batch_tokens = max_batch_tokens
        self.page_size = page_size

    def generate(
        self, prompts: str | list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [Sequence(self._encode(p), sp) for p, sp in zip(prompts, params, strict=True)]
        runner = self._runner(seqs)
        generators = [_generator(s.params.seed, self.device) for s in seqs]
        self._prefill(runner, seqs, generators)
        while running := [(s, g) for s, g in zip(seqs, generators, strict=True) if not s.finished]:
            logits = runner.run([(s, 1) for s, _ in running])
            for (seq, gen), row in zip(running, logits, strict=True):
                self._append(seq, row, gen)
        return [self._output(p, s) for p, s in zip(prompts, seqs, strict=True)]

    def graph_stats(self) -> dict[str, object]:
        """Graph runtime counters of this engine (eager on CPU: nothing replays)."""
        return {"mode": "eager", "device": self.device.type, "replays": {}, "eager_fallbacks": {}}

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

    def _runner(self, seqs: list[Sequence]) -> ModelRunner:
        pages = sum(-(-(len(s.prompt_token_ids) + s.params.max_tokens) // self.page_size) for s in seqs)
        return ModelRunner(self.model, self.cfg, num_pages=pages + 1, page_size=self.page_size)

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
