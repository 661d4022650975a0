"""`tessera.LLM`: offline batched generation on the engine (continuous batching underneath)."""

from __future__ import annotations

from tessera.engine.engine import Engine, RequestOutput
from tessera.engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput"]


class LLM(Engine):
    def generate(
        self, prompts: str | list[str], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                seqs.append(self.add(self.tokenizer.encode(prompt), sp))
            while self.has_work:
                self.step()
        except BaseException:
            for seq in seqs:
                self.abort(seq)
            raise
        return [self.output(p, s) for p, s in zip(prompts, seqs, strict=True)]

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate(self.tokenizer.apply_chat_template(messages), params)[0]
