"""Runs one scheduled batch through the model and returns the logits of the sequences that sample.

It holds the KV cache tensors (which pages a sequence uses is the scheduler's: the runner never
allocates), the attention layer table, and two kinds of graph of the runtime sharing one backend, one
memory pool and one `GraphStats`: full graphs (decode batches, small extend batches) and piecewise
graphs. `dispatch` decides once per step what a batch runs as — a `BatchDescriptor` (mode, padded size)
— and `forward` runs exactly that: a full graph, the piecewise graphs of that size, or eagerly inside
the same forward context.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.distributed import tp_size
from tessera.engine.batch import ForwardBatch, ScheduledBatch, build_batch, kernel_layout
from tessera.engine.config import EngineConfig
from tessera.engine.graph_inputs import GraphInputs, full_graph_descriptors
from tessera.engine.kv_cache import DUMMY_SLOT, KVCache
from tessera.graphs import (
    DISABLED,
    BatchDescriptor,
    ForwardContext,
    FullGraphRunner,
    GraphConfig,
    GraphMode,
    GraphStats,
    PiecewiseGraphRunner,
    forward_context,
    make_backend,
)
from tessera.layers import moe
from tessera.layers.attention import AttentionLayer
from tessera.layers.attention_metadata import AttentionMetadata, SeqLayout
from tessera.layers.mla import MLALayer

logger = logging.getLogger("tessera")


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig,
        *,
        num_pages: int,
        kv: KVCache | None = None,
        verifies: bool = True,
    ) -> None:
        """`kv`: cache tensors to use instead of allocating them (a self-speculation draft reads and
        writes its target's first layers' cache). `verifies`: whether this runner forwards speculative
        verify batches (a draft's does not: no graphs for them)."""
        self.model, self.config = model, config
        self.verify_len = 1 + config.speculative.num_steps if verifies else 1
        self.model_config = mc = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.page_size = page_size = config.page_size
        # a model whose forward takes a third input, features [T, hidden] (an EAGLE head)
        self.feature_input: bool = getattr(model, "feature_input", False)
        self.last_hidden: torch.Tensor | None = None  # the last forward's hidden states [T, hidden]
        self.last_logits_hidden: torch.Tensor | None = None  # ... at the rows that got logits
        self.last_batch: ForwardBatch | None = None  # the last `run`'s batch
        # with tensor parallelism, called with each forward before it runs: rank 0 sends the other ranks
        # the batch, which run the same forward (tessera/engine/parallel.py)
        self.on_forward: Callable[[ForwardBatch, BatchDescriptor], None] | None = None
        self.kv = kv or KVCache.allocate(
            mc.num_layers, num_pages, page_size, model.local_kv_heads, mc.head_dim, self.dtype, self.device,
            v_head_dim=mc.v_head_dim,
        )  # fmt: skip
        self.attention_backend = self._attention_backend()
        self.layers = self._layer_table(model)
        if self.attention_backend == "triton" and mc.mla is None and self.device.type != "cpu":
            # NOTE: every block shape a batch can pick, compiled now: a variant first met while serving
            # stalls that step for the ~1 s its compile takes
            from tessera.layers.triton_attention import compile_variants

            layer = self.layers[(0, "attn")]
            heads = mc.num_heads // tp_size()  # this rank's query heads
            compile_variants(layer.k_cache, layer.v_cache, heads, page_size)
        # NOTE: the experts' backend lives on the model's modules, so runners sharing a model share it
        for module in model.modules():
            if isinstance(module, moe.Experts):
                module.backend = config.runner.moe_runner_backend
        self.stats = GraphStats()
        graphs_possible = self._graphs_possible()
        self.graphs = self._capture_piecewise() if graphs_possible and self._piecewise_wanted() else None
        self.full_graphs: FullGraphRunner | None = None
        self.graph_inputs: GraphInputs | None = None
        if graphs_possible and self._full_wanted():
            self._capture_full()

    # ---------------------------------------------------------------- start-up

    def _layer_table(self, model: nn.Module) -> dict[tuple[int, str], Any]:
        """What each attention split op finds in the forward context, by (layer, role): "attn" for
        GQA layers; "mla_mha" and "mla_mqa" (one object, one latent cache) for MLA layers."""
        mc, page, backend = self.model_config, self.page_size, self.attention_backend
        if mc.mla is None:
            scale = mc.head_dim**-0.5
            return {
                (i, "attn"): AttentionLayer(self.kv.k[i], self.kv.v[i], scale, page, backend)
                for i in range(mc.num_layers)
            }
        table: dict[tuple[int, str], Any] = {}
        for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr]
            mla = MLALayer(self.kv.k[i], layer.self_attn, page, backend=backend)
            table[(i, "mla_mha")] = table[(i, "mla_mqa")] = mla
        return table

    def _attention_backend(self) -> str:
        wanted = self.config.runner.attention_backend
        if wanted == "auto":
            return "triton" if self.device.type == "cuda" else "torch"
        return wanted

    def _graphs_possible(self) -> bool:
        r = self.config.runner
        if not (self.device.type == "cuda" or r.emulate_graphs_on_cpu):
            return False
        if r.disable_piecewise_cuda_graph and r.disable_cuda_graph:
            return False
        moe_on_gpu = self.model_config.moe is not None and self.device.type == "cuda"
        if moe_on_gpu and not self._experts_capture_safe():
            logger.warning(
                "MoE experts (%s, %s) are not capture-safe here: running without CUDA graphs",
                self.config.runner.moe_runner_backend,
                str(self.dtype).removeprefix("torch."),
            )
            return False
        return True

    def _experts_capture_safe(self) -> bool:
        # NOTE: the reference expert loop (no Triton) reads per-expert counts on the host, and
        # torch._grouped_mm does outside bfloat16 on sm90/sm100; "auto" avoids the latter by itself.
        # A quantized format says for itself (FP8 experts dequantize per expert, counted on the host).
        experts = [m for m in self.model.modules() if isinstance(m, moe.Experts)]
        if not all(e.method.capture_safe for e in experts):
            return False
        if self.config.runner.moe_runner_backend == "grouped_mm":
            return moe.grouped_mm_capture_safe(self.dtype, self.device)
        return moe.CAPTURE_SAFE_ON_CUDA

    def _piecewise_wanted(self) -> bool:
        return not self.config.runner.disable_piecewise_cuda_graph

    def _full_wanted(self) -> bool:
        if self.config.runner.disable_cuda_graph:
            return False
        if self.attention_backend != "triton":
            logger.warning("full CUDA graphs need --attention-backend triton; running without them")
            return False
        return True

    def _graph_config(self) -> GraphConfig:
        r = self.config.runner
        return GraphConfig(
            strategy=r.piecewise_cuda_graph_strategy,  # type: ignore[arg-type]
            compiler=r.piecewise_cuda_graph_compiler,  # type: ignore[arg-type]
            max_tokens=self.config.graph_max_tokens(mla=self.model_config.mla is not None),
            poison_padding=r.debug_poison_padding,
            capture_sizes=r.piecewise_cuda_graph_tokens,
            disable_hint="pass --disable-piecewise-cuda-graph",
        )

    def _capture_piecewise(self) -> PiecewiseGraphRunner:
        runner = PiecewiseGraphRunner(
            self.model,
            self._graph_config(),
            layers=self.layers,
            capture_metadata=self._capture_metadata,
            stats=self.stats,
        )
        example = torch.arange(8, device=self.device)
        inputs = [example % self.model_config.vocab_size, example]
        if self.feature_input:
            inputs.append(torch.ones(8, self.model_config.hidden_size, dtype=self.dtype, device=self.device))
        with torch.no_grad():
            runner.capture(inputs)
        return runner

    def _capture_full(self) -> None:
        r = self.config.runner
        # NOTE: MLA layers pick one of two attention paths per batch on the host: an extend graph would
        # freeze the one of its capture batch
        extend_max = r.extend_cuda_graph_max_tokens if self.model_config.mla is None else 0
        # the piecewise graphs' token counts (default or given), up to the extend graphs' limit
        extend = [t for t in self._graph_config().sizes if t <= extend_max]
        descriptors = full_graph_descriptors(
            self.config.decode_graph_max_bs, extend, r.extend_cuda_graph_max_seqs,
            verify_len=self.verify_len,
        )  # fmt: skip
        if not descriptors:
            return
        inputs = GraphInputs(
            self.model,
            self.layers,
            descriptors,
            max_pages_per_seq=-(-self.model_config.max_position_embeddings // self.page_size),
            page_size=self.page_size,
            device=self.device,
        )
        # NOTE: the piecewise runner's backend, so both kinds of graph share one memory pool
        backend = self.graphs.backend if self.graphs is not None else None
        self.full_graphs = FullGraphRunner(
            inputs.forward,
            inputs.stage,
            backend or make_backend(self.device),
            stats=self.stats,
            poison=inputs.poison if r.debug_poison_padding else None,
        )
        self.full_graphs.capture(inputs.descriptors)
        self.graph_inputs = inputs

    def _capture_metadata(self, num_tokens: int) -> AttentionMetadata:
        """A batch of one sequence of `num_tokens` tokens that lives entirely in the dummy slot: capture
        writes and reads no real sequence's cache."""
        slots = torch.full((num_tokens,), DUMMY_SLOT, dtype=torch.long, device=self.device)
        layout = SeqLayout(num_tokens, num_tokens)
        pages = [[DUMMY_SLOT // self.page_size] * -(-num_tokens // self.page_size)]
        return AttentionMetadata(slots, kernel_layout([layout], pages, self.device), [layout])

    # ---------------------------------------------------------------- serving

    def graph_stats(self) -> dict[str, Any]:
        """Replays by kind and padded size, eager forwards by reason, real and padded tokens."""
        return self.stats.as_dict()

    @torch.no_grad()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Forward a scheduled batch -> logits [sum(batch.logits_rows), vocab] in float32: one row per
        sampling sequence, 1 + K per verify."""
        forward_batch = self.last_batch = build_batch(batch.work, self.page_size, self.device)
        rows = batch.sample_rows
        if batch.verifies:  # every verified position's logits: the last 1 + K rows of each verify
            forward_batch.select_logits(_last_rows(forward_batch, rows, batch.logits_rows))
        elif len(rows) < len(batch.work):
            forward_batch.select_logits(forward_batch.last_rows[rows])
        drafts = batch.device_drafts
        if drafts is not None:  # each verify's drafts: its last rows but one
            draft_rows = _last_rows(forward_batch, list(batch.draft_room), drafts.counts)
            forward_batch.feed_at(draft_rows, drafts.tokens)
        return self.forward(forward_batch)

    def dispatch(self, batch: ForwardBatch) -> BatchDescriptor:
        """What `batch` runs as: the smallest full graph that takes it, else the piecewise graphs of its
        padded size, else eagerly."""
        n = batch.num_tokens
        if self.graph_inputs is not None:
            descriptor = self.graph_inputs.select(batch)
            if descriptor is not None:
                return descriptor
        if self.graphs is not None:
            return self.graphs.descriptor(n)
        return BatchDescriptor(GraphMode.EAGER, n)

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, descriptor: BatchDescriptor | None = None) -> torch.Tensor:
        """Logits of `batch.logits_indices` for one forward run as `descriptor` (default: `dispatch`);
        the hidden states of every row stay in `last_hidden` until the next forward, those of the rows
        that got logits in `last_logits_hidden` (a copy). Leaves the sequences as they were (a benchmark
        can replay the same batch)."""
        features = batch.features
        if (features is not None) != self.feature_input:
            raise ValueError("features go with a model that takes them (an EAGLE head), and only there")
        d = descriptor or self.dispatch(batch)
        if self.on_forward is not None:
            self.on_forward(batch, d)
        n = batch.num_tokens
        if d.mode is GraphMode.FULL:
            assert self.full_graphs is not None and self.graph_inputs is not None
            hidden = self.full_graphs.run(d, batch, n)
            # the logits rows were staged with the batch: nothing of it is uploaded
            rows = self.graph_inputs.logits_rows[: len(batch.host_logits)]
        else:
            inputs = (batch.input_ids, batch.positions) + ((features,) if features is not None else ())
            if self.graphs is not None:
                hidden = self.graphs.run(d, *inputs, metadata=batch.metadata)
            else:
                self.stats.record_fallback(DISABLED, n)
                with forward_context(ForwardContext(n, n, batch.metadata, self.layers)):
                    hidden = self.model(*inputs)
            rows = batch.logits_indices
        self.last_hidden = hidden
        self.last_logits_hidden = selected = hidden[rows]
        return self.model.compute_logits(selected)


def _last_rows(batch: ForwardBatch, seqs: list[int], counts: list[int]) -> np.ndarray:
    """The last `counts[j]` rows of the `seqs[j]`-th sequence of `batch`, for each j, in that order."""
    n = np.array(counts, dtype=np.int64)
    first = np.repeat(batch.last_rows[seqs] - n + 1, n)
    return first + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)


def num_kv_pages(config: EngineConfig, models: list[nn.Module], device: torch.device) -> int:
    """KV pages for `models` sharing one page table: a fraction of the GPU memory still free after
    loading, or a fixed budget on a CPU."""
    # K and V (MLA: the latent alone) of every layer, per token
    per_token = sum(
        m.config.num_layers * m.local_kv_heads * (m.config.head_dim + m.config.v_head_dim) for m in models
    )
    page_bytes = config.page_size * per_token * config.torch_dtype.itemsize
    if device.type == "cuda":
        # NOTE: what engines dropped earlier in this process still sits in the caching allocator, which
        # mem_get_info counts as used (and graph captures, in their own pool, cannot reuse)
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        pages = int(free * config.mem_fraction) // page_bytes
    else:
        pages = -(-config.cpu_kv_tokens // config.page_size)
    logger.info(
        "KV cache: %d pages of %d tokens (%.0f MiB)", pages, config.page_size, pages * page_bytes / 2**20
    )
    return max(pages, 2)
