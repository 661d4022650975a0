"""Engine settings: one frozen `EngineConfig` with the scheduler's and the model runner's settings nested
in it, each value defined once. Field names follow SGLang's server flags, so they read the same on the
command line (`tessera/cli.py` builds an `EngineConfig` from them in one place)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

# SGLang's cap on DeepSeek's piecewise capture sizes: MLA's per-size graphs are large
MLA_GRAPH_MAX_TOKENS = 2048
LOAD_FORMATS = ("auto", "dummy")
# --quantization: online FP8 / MXFP4 of an unquantized checkpoint; for a GGUF file "gguf" (kept in its
# blocks) or "none" (dequantized at load)
QUANTIZATIONS = ("fp8", "fp8_block", "mxfp4", "gguf", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler may put into one forward."""

    chunked_prefill_size: int = 2048  # prompt tokens of one forward
    # All tokens of one forward, decodes included; None: chunked_prefill_size, so a mixed batch never
    # outgrows the piecewise graphs' range (whose default top is the chunked-prefill size).
    max_num_batched_tokens: int | None = None
    max_running_requests: int = 256
    disable_radix_cache: bool = False

    def __post_init__(self) -> None:
        if min(self.token_budget, self.chunked_prefill_size, self.max_running_requests) < 1:
            raise ValueError("scheduler budgets must be >= 1")

    @property
    def token_budget(self) -> int:
        """All tokens of one forward (derived here, not stored: `replace(config, chunked_prefill_size=n)`
        must move it too)."""
        if self.max_num_batched_tokens is None:
            return self.chunked_prefill_size
        return self.max_num_batched_tokens


@dataclass(frozen=True)
class RunnerConfig:
    """How the model runner runs a forward: which graphs, which kernels."""

    disable_piecewise_cuda_graph: bool = False
    # default: the chunked-prefill size, capped at MLA_GRAPH_MAX_TOKENS for MLA models
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
    # Why 512 and 8: docs/architecture.md ("Full graphs for small extend batches").
    extend_cuda_graph_max_tokens: int = 512
    extend_cuda_graph_max_seqs: int = 8
    # Use the graph runtime's emulated backend on a CPU (tests); otherwise a CPU runs eagerly.
    emulate_graphs_on_cpu: bool = False
    # Debug: every padded replay is re-run with poisoned padding and must leave real rows unchanged.
    debug_poison_padding: bool = False

    def __post_init__(self) -> None:
        if self.extend_cuda_graph_max_tokens < 0 or self.extend_cuda_graph_max_seqs < 1:
            raise ValueError("extend_cuda_graph_max_tokens must be >= 0 and extend_cuda_graph_max_seqs >= 1")
        if self.cuda_graph_max_bs < 0:
            raise ValueError(f"cuda_graph_max_bs must be >= 0, got {self.cuda_graph_max_bs}")
        _check_choice(
            "piecewise graph strategy", self.piecewise_cuda_graph_strategy, ("breakable", "compile")
        )
        _check_choice("piecewise graph compiler", self.piecewise_cuda_graph_compiler, ("eager", "inductor"))
        _check_choice("attention backend", self.attention_backend, ("auto", "torch", "triton"))
        _check_choice("MoE runner backend", self.moe_runner_backend, ("auto", "triton", "grouped_mm"))


SPECULATIVE_ALGORITHMS = ("NGRAM", "STANDALONE", "EAGLE")
DEFAULT_SPECULATIVE_STEPS = 3


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, in SGLang's spelling. A proposer drafts `num_steps` tokens per running
    request (a chain: `num_draft_tokens` = steps + 1, the request's last token included), and one
    target forward verifies them all. NGRAM: the continuation of the longest recent n-gram match in the
    request's own tokens. STANDALONE: a draft model sharing the target's vocabulary, loaded from
    `draft_model_path`, or the target's own first `draft_layers` layers (self-speculation, no extra
    weights). EAGLE: a one-layer head over the target's hidden states, from `draft_model_path`,
    drafting from the token ids of `token_map` only if one is given (a hot vocabulary)."""

    speculative_algorithm: str | None = None
    speculative_num_steps: int | None = None  # default: DEFAULT_SPECULATIVE_STEPS
    speculative_num_draft_tokens: int | None = None  # default: num_steps + 1
    speculative_draft_model_path: str | None = None
    speculative_draft_layers: int | None = None
    speculative_token_map: str | None = None
    speculative_ngram_min_match_window_size: int = 1
    speculative_ngram_max_match_window_size: int = 12

    def __post_init__(self) -> None:
        algo, path, layers = self.algorithm, self.speculative_draft_model_path, self.speculative_draft_layers
        if algo is None:
            given = [f for f in ("speculative_num_steps", "speculative_num_draft_tokens",
                                 "speculative_draft_model_path", "speculative_draft_layers",
                                 "speculative_token_map")
                     if getattr(self, f) is not None]  # fmt: skip
            if given:
                flags = ", ".join("--" + f.replace("_", "-") for f in given)
                raise ValueError(
                    f"{flags} need --speculative-algorithm ({', '.join(SPECULATIVE_ALGORITHMS)})"
                )
            return
        _check_choice("speculative algorithm", algo, SPECULATIVE_ALGORITHMS)
        steps, tokens = self.speculative_num_steps, self.speculative_num_draft_tokens
        if steps is not None and tokens is not None and tokens != steps + 1:
            raise ValueError(
                f"--speculative-num-draft-tokens {tokens} must be --speculative-num-steps + 1 = {steps + 1} "
                "(drafts are a chain: top-k 1)"
            )
        if not 1 <= self.num_steps <= 32:
            raise ValueError(f"speculative steps must be in [1, 32], got {self.num_steps}")
        if algo == "NGRAM" and (path is not None or layers is not None):
            raise ValueError("NGRAM drafts from the request's own tokens: it takes no draft model or layers")
        if algo == "STANDALONE" and (path is None) == (layers is None):
            raise ValueError(
                "STANDALONE needs a draft: --speculative-draft-model-path, or --speculative-draft-layers "
                "to draft with the target's own first layers (not both)"
            )
        if algo == "EAGLE" and (path is None or layers is not None):
            raise ValueError("EAGLE needs --speculative-draft-model-path (the head) and no draft layers")
        if self.speculative_token_map is not None and algo != "EAGLE":
            raise ValueError("--speculative-token-map is EAGLE's (the head's hot vocabulary)")
        if layers is not None and layers < 1:
            raise ValueError(f"--speculative-draft-layers must be >= 1, got {layers}")
        lo, hi = self.speculative_ngram_min_match_window_size, self.speculative_ngram_max_match_window_size
        if not 1 <= lo <= hi:
            raise ValueError(f"n-gram match windows need 1 <= min <= max, got {lo} and {hi}")

    @property
    def algorithm(self) -> str | None:
        return self.speculative_algorithm.upper() if self.speculative_algorithm else None

    @property
    def num_steps(self) -> int:
        """Draft tokens proposed per request and step (K); 0 without speculation."""
        if self.algorithm is None:
            return 0
        if self.speculative_num_steps is not None:
            return self.speculative_num_steps
        if self.speculative_num_draft_tokens is not None:
            return self.speculative_num_draft_tokens - 1
        return DEFAULT_SPECULATIVE_STEPS


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from. `model`: a `.gguf` file or an HF folder (None: the embedded
    SmolLM2-135M-Instruct); `dtype`/`device` None: bfloat16 on a GPU, float32 on a CPU."""

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    load_format: str = "auto"  # dummy: the folder's config.json with random weights (benchmarks)
    # None: as the checkpoint is (FP8 / MXFP4 checkpoints in their format); a GGUF file is dequantized at
    # load unless "gguf" keeps its blocks (loader/model_loader.py: `_gguf_quant` says why)
    quantization: str | None = None
    page_size: int = 16  # tokens per KV page
    mem_fraction: float = 0.8  # of the GPU memory free after loading, for the KV cache
    cpu_kv_tokens: int = 8192  # the KV cache's size on a CPU
    context_length: int | None = None  # overrides the model's context length (None: the model's)
    chat_template: str | None = None  # a jinja file overriding the tokenizer's chat template
    # Tensor parallelism: one process per rank (rank 0 the engine's own, scheduling and sampling), each
    # holding a slice of every layer; experts spread over the same ranks (ep = tp) or split like an MLP
    # (ep = 1). See docs/architecture.md ("Tensor parallelism").
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    dist_timeout: float = 60.0  # seconds a collective may wait for another rank before it is an error
    # where the model's all-reduces go: "inside" the graph pieces (NCCL is capturable) or "split" (a
    # graph boundary, run eagerly: SGLang's fallback); both measurable (benchmarks/tp_step.py)
    all_reduce_placement: str = "inside"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if not 0 < self.mem_fraction < 1:
            raise ValueError(f"mem_fraction must be in (0, 1), got {self.mem_fraction}")
        if self.cpu_kv_tokens < 1:
            raise ValueError(f"cpu_kv_tokens must be >= 1, got {self.cpu_kv_tokens}")
        if self.context_length is not None and self.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {self.context_length}")
        _check_choice("load format", self.load_format, LOAD_FORMATS)
        if self.quantization is not None:
            _check_choice("quantization", self.quantization, QUANTIZATIONS)
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, DTYPES)
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        if tp < 1:
            raise ValueError(f"tensor_parallel_size (--tp) must be >= 1, got {tp}")
        if ep not in (1, tp):
            raise ValueError(
                f"expert_parallel_size (--ep) must be 1 or the tensor parallel size {tp} (experts are spread "
                f"over the TP ranks), got {ep}"
            )
        _check_choice("all-reduce placement", self.all_reduce_placement, ("inside", "split"))
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")

    @classmethod
    def create(cls, model: str | None = None, **settings: Any) -> EngineConfig:
        """An `EngineConfig` from flat keyword arguments, each going to whichever of the engine, scheduler
        or runner settings has a field of that name (`LLM(path, chunked_prefill_size=512, device="cpu")`)."""
        parts = {"scheduler": SchedulerConfig, "runner": RunnerConfig, "speculative": SpeculativeConfig}
        nested: dict[str, dict[str, Any]] = {part: {} for part in parts}
        for key in list(settings):
            for part, kind in parts.items():
                if key in kind.__dataclass_fields__:
                    nested[part][key] = settings.pop(key)
        unknown = set(settings) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown engine settings: {', '.join(sorted(unknown))}")
        for part, kind in parts.items():
            settings[part] = replace(settings.get(part, kind()), **nested[part])
        return cls(model=model, **settings)

    @classmethod
    def setting_names(cls) -> set[str]:
        """Every flat setting `create` takes (the CLI's flags are named after them)."""
        names = set(cls.__dataclass_fields__) - {"scheduler", "runner", "speculative"}
        for kind in (SchedulerConfig, RunnerConfig, SpeculativeConfig):
            names |= set(kind.__dataclass_fields__)
        return names

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32

    @property
    def decode_graph_max_bs(self) -> int:
        """The largest decode graph: no decode batch outgrows the running limit, so capturing beyond it
        would only cost start-up."""
        return min(self.runner.cuda_graph_max_bs, self.scheduler.max_running_requests)

    def graph_max_tokens(self, mla: bool = False) -> int:
        """The largest piecewise capture size. MLA models cap it at MLA_GRAPH_MAX_TOKENS while chunked
        prefill may stay larger; a batch above it runs eagerly inside the same forward context."""
        if self.runner.piecewise_cuda_graph_max_tokens:
            return self.runner.piecewise_cuda_graph_max_tokens
        chunk = self.scheduler.chunked_prefill_size
        return min(chunk, MLA_GRAPH_MAX_TOKENS) if mla else chunk


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: {', '.join(choices)}")
