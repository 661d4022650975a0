"""Engine settings, named after SGLang's server flags so they read the same on the command line."""

from __future__ import annotations

from dataclasses import dataclass

MLA_GRAPH_MAX_TOKENS = 2048


@dataclass(frozen=True)
class RunnerConfig:
    page_size: int = 16
    chunked_prefill_size: int = 2048  # most prompt tokens one forward runs
    disable_piecewise_cuda_graph: bool = False
    # default: chunked_prefill_size, capped at MLA_GRAPH_MAX_TOKENS for MLA models
    piecewise_cuda_graph_max_tokens: int | None = None
    piecewise_cuda_graph_tokens: tuple[int, ...] | None = None  # explicit capture sizes
    piecewise_cuda_graph_strategy: str = "breakable"
    piecewise_cuda_graph_compiler: str = "eager"
    attention_backend: str = "auto"  # auto: triton on a GPU, torch on a CPU
    moe_runner_backend: str = "auto"  # auto: by batch size (see layers/moe.py); triton; grouped_mm
    disable_cuda_graph: bool = False  # no full CUDA graphs (decode, and small extend batches)
    cuda_graph_max_bs: int = 256  # SGLang's default on large GPUs; capped by the running limit
    # Full graphs (attention captured) for extend and mixed batches of at most this many tokens in at
    # most `extend_cuda_graph_max_seqs` sequences; larger ones go through the piecewise graphs. 0: none.
    # NOTE: on an H200 they made SmolLM2's steps 7-9% faster at 16-128 tokens and 7-20% at 256-512
    # (step_h200_extend_full_graphs.json); its piecewise steps of 512 tokens over 8 sequences, ~0.7 ms
    # of host work against ~1.2 ms on the GPU, turned host-bound whenever the host slowed (1.36-1.44x
    # the floor; step_h200_smollm2_repeats.json, step_h200_2c28434_slow_host.json); as one graph 1.11x.
    # A Llama-3-8B step hides the breaks either way (its kernels are long); its start-up with all of
    # them: 6.6 s (6.4 s with 128, in an earlier run on another host).
    extend_cuda_graph_max_tokens: int = 512
    extend_cuda_graph_max_seqs: int = 8
    # Use the graph runtime's emulated backend on a CPU (tests); otherwise a CPU runs eagerly.
    emulate_graphs_on_cpu: bool = False
    # Debug: every padded replay is re-run with poisoned padding and must leave real rows unchanged.
    debug_poison_padding: bool = False

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.chunked_prefill_size < 1:
            raise ValueError("page_size and chunked_prefill_size must be >= 1")
        if self.extend_cuda_graph_max_tokens < 0 or self.extend_cuda_graph_max_seqs < 1:
            raise ValueError("extend_cuda_graph_max_tokens must be >= 0 and extend_cuda_graph_max_seqs >= 1")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"unknown attention backend {self.attention_backend!r}: auto, torch or triton")
        if self.moe_runner_backend not in ("auto", "triton", "grouped_mm"):
            raise ValueError(
                f"unknown MoE runner backend {self.moe_runner_backend!r}: auto, triton or grouped_mm"
            )

    def graph_max_tokens(self, mla: bool = False) -> int:
        """The largest piecewise capture size. MLA models cap it at MLA_GRAPH_MAX_TOKENS (SGLang's
        choice for DeepSeek: its per-size graphs are large) while chunked prefill may stay larger; a
        batch above it runs eagerly inside the same forward context."""
        if self.piecewise_cuda_graph_max_tokens:
            return self.piecewise_cuda_graph_max_tokens
        return min(self.chunked_prefill_size, MLA_GRAPH_MAX_TOKENS) if mla else self.chunked_prefill_size
