"""`tessera.LLM`: offline batched generation on the engine (continuous batching underneath)."""

from __future__ import annotations

from typing import Any

from tessera.engine.config import EngineConfig
from tessera.engine.engine import Engine, RequestOutput
from tessera.engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput"]


class LLM(Engine):
    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **settings: Any) -> None:
        """`LLM()` (the embedded SmolLM2), `LLM("model.gguf")`, `LLM("hf-folder/", device="cpu",
        chunked_prefill_size=512)`: settings are `EngineConfig`'s fields and its scheduler's and
        runner's (see `EngineConfig.create`); or a whole `config`."""
        if config is not None and (model is not None or settings):
            raise TypeError("pass either an EngineConfig or a model and settings, not both")
        super().__init__(config or EngineConfig.create(None if model is None else str(model), **settings))

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Prompts are texts or token-id lists; all of them run together."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)
                seqs.append(self.add(ids, sp))
            while self.has_work:
                self.step()
        except BaseException:
            for seq in seqs:
                self.abort(seq)
            raise
        texts = [self.tokenizer.decode(p) if isinstance(p, list) else p for p in prompts]
        return [self.output(p, s) for p, s in zip(texts, seqs, strict=True)]

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        return self.generate(self.tokenizer.apply_chat_template(messages), params)[0]
