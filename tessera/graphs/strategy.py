"""The interface both capture strategies implement; the runner drives it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from tessera.graphs.config import GraphConfig
from tessera.graphs.platform import GraphBackend

Inputs = tuple[torch.Tensor, ...]


class CaptureStrategy(ABC):
    """Turns `forward` into graphs per token count. Every call happens inside a forward context."""

    def __init__(self, forward: Callable[..., Any], backend: GraphBackend, config: GraphConfig):
        self.forward = forward
        self.backend = backend
        self.config = config
        self.location = "start-up"  # where capture is now, for error messages
        self._fallback: str | None = None

    @property
    @abstractmethod
    def num_pieces(self) -> int: ...

    @abstractmethod
    def prepare(self, inputs: Inputs) -> None:
        """One-time work before any capture, run at the largest size."""

    @abstractmethod
    def capture(self, size: int, inputs: Inputs) -> Any:
        """Warm up and capture `size`; returns the forward's outputs."""

    @abstractmethod
    def replay(self, size: int, inputs: Inputs) -> Any:
        """Replay the graphs of `size`; returns outputs that live until the next forward."""

    def finish_startup(self) -> None:
        """Capture is over: from here on nothing new is captured."""
        return None

    def where(self) -> str:
        return self.location

    def take_fallback(self) -> str | None:
        """Why the last replay ran general-shape code instead of graphs, if it did."""
        reason, self._fallback = self._fallback, None
        return reason
