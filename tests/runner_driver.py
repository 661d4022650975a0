"""A model runner driven without a scheduler, as the model and graph tests drive it: each `run(work)`
reserves the pages of `work` from a KV manager over the runner's cache, runs one forward with logits for
every row, and advances the sequences' cached length (what `Scheduler.postprocess` does in the engine)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tessera.engine.batch import ScheduledBatch, build_batch
from tessera.engine.config import EngineConfig
from tessera.engine.kv_manager import KVManager
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sequence import Sequence


class RunnerDriver:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.kv_manager = KVManager(runner.kv.num_pages, runner.page_size, prefix_cache=False)

    def __getattr__(self, name: str) -> Any:  # the runner's attributes (layers, kv, graphs, ...)
        return getattr(self.runner, name)

    def run(self, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Logits [len(work), vocab] of each sequence's last token run now."""
        self._reserve(work)
        logits = self.runner.run(ScheduledBatch(work, list(range(len(work)))))
        for seq, n in work:
            seq.num_cached += n
        return logits

    def batch(self, work: list[tuple[Sequence, int]]) -> Any:
        """The forward batch of `work` (pages reserved, nothing run)."""
        self._reserve(work)
        return build_batch(work, self.runner.page_size, self.runner.device)

    def _reserve(self, work: list[tuple[Sequence, int]]) -> None:
        for seq, n in work:
            assert self.kv_manager.reserve(seq, n), "test KV cache too small"

    def free(self, seq: Sequence) -> None:
        self.kv_manager.release(seq, keep_prefix=False)


def make_runner(
    model: nn.Module,
    *,
    num_pages: int,
    page_size: int = 16,
    chunked_prefill_size: int = 2048,
    **runner_settings: Any,
) -> RunnerDriver:
    """A runner over `model` with `RunnerConfig` fields given as keyword arguments."""
    config = EngineConfig.create(
        page_size=page_size, chunked_prefill_size=chunked_prefill_size, **runner_settings
    )
    return RunnerDriver(ModelRunner(model, config, num_pages=num_pages))
