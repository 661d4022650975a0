"""Engine settings, named after SGLang's server flags so they read the same on the command line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunnerConfig:
    page_size: int = 16
    chunked_prefill_size: int = 2048  # most prompt tokens one forward runs
    disable_piecewise_cuda_graph: bool = False
    piecewise_cuda_graph_max_tokens: int | None = None  # default: chunked_prefill_size
    piecewise_cuda_graph_tokens: tuple[int, ...] | None = None  # explicit capture sizes
    piecewise_cuda_graph_strategy: str = "breakable"
    piecewise_cuda_graph_compiler: str = "eager"
    attention_backend: str = "auto"  # auto: triton on a GPU, torch on a CPU
    disable_cuda_graph: bool = False  # full CUDA graphs for decode batches
    cuda_graph_max_bs: int = 256  # SGLang's default on large GPUs; capped by the running limit
    # Use the graph runtime's emulated backend on a CPU (tests); otherwise a CPU runs eagerly.
    emulate_graphs_on_cpu: bool = False

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.chunked_prefill_size < 1:
            raise ValueError("page_size and chunked_prefill_size must be >= 1")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown attention backend {self.attention_backend!r}: auto, torch or triton")

    @property
    def graph_max_tokens(self) -> int:
        return self.piecewise_cuda_graph_max_tokens or self.chunked_prefill_size
