"""Runs one scheduled batch through the model: builds the batch tensors, runs the forward — through
piecewise graphs when they are on, eagerly otherwise, inside the same forward context either way — and
returns logits of each sequence's last token."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tessera.engine.batch import ForwardBatch, build_batch, commit, kernel_layout
from tessera.engine.config import RunnerConfig
from tessera.engine.full_graphs import FullGraphRunner, graph_shapes
from tessera.engine.kv_cache import DUMMY_SLOT, KVCache, PagePool
from tessera.engine.sequence import Sequence
from tessera.graphs import ForwardContext, GraphConfig, PiecewiseGraphRunner, forward_context
from tessera.graphs.platform import make_backend
from tessera.layers import moe
from tessera.layers.attention import AttentionLayer, AttentionMetadata, SeqLayout
from tessera.layers.mla import MLALayer
from tessera.models.config import ModelConfig

logger = logging.getLogger("tessera")


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        cfg: ModelConfig,
        *,
        num_pages: int,
        page_size: int = 16,
        config: RunnerConfig | None = None,
    ) -> None:
        self.model, self.cfg = model, cfg
        self.config = config or RunnerConfig(page_size=page_size)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.page_size = page_size = self.config.page_size
        self.kv = KVCache.allocate(
            cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device,
            v_head_dim=cfg.v_head_dim,
        )  # fmt: skip
        self.pool = PagePool(num_pages)
        self.attention_backend = self._attention_backend()
        self.layers = self._layer_table(model)
        if self.attention_backend == "triton" and cfg.mla is None and self.device.type != "cpu":
            # NOTE: every block shape a batch can pick, compiled now: a variant first met while serving
            # stalls that step for the ~1 s its compile takes
            from tessera.layers.triton_attention import compile_variants

            layer = self.layers[(0, "attn")]
            compile_variants(layer.k_cache, layer.v_cache, cfg.num_heads, page_size)
        # NOTE: the experts' backend lives on the model's modules, so runners sharing a model share it
        for module in model.modules():
            if isinstance(module, moe.Experts):
                module.backend = self.config.moe_runner_backend
        if (
            cfg.moe is not None
            and self.device.type == "cuda"
            and not moe.CAPTURE_SAFE_ON_CUDA
            and self.config.moe_runner_backend != "grouped_mm"
            and not (self.config.disable_piecewise_cuda_graph and self.config.disable_cuda_graph)
        ):
            # NOTE: without Triton the experts run the reference loop, which reads per-expert counts on
            # the host: no CUDA graph can capture that
            logger.warning(
                "MoE without Triton: running without CUDA graphs (the expert loop is not capture-safe)"
            )
            self.config = replace(self.config, disable_piecewise_cuda_graph=True, disable_cuda_graph=True)
        self.graphs = self._capture_graphs() if self._graphs_wanted() else None
        self.full_graphs = self._capture_full_graphs() if self._full_graphs_wanted() else None

    def _layer_table(self, model: nn.Module) -> dict[tuple[int, str], Any]:
        """What each attention split op finds in the forward context, by (layer, role): "attn" for
        Llama-style layers; "mla_mha" and "mla_mqa" (one object, one latent cache) for MLA layers."""
        cfg, page, backend = self.cfg, self.page_size, self.attention_backend
        if cfg.mla is None:
            scale = cfg.head_dim**-0.5
            return {
                (i, "attn"): AttentionLayer(self.kv.k[i], self.kv.v[i], scale, page, backend)
                for i in range(cfg.num_layers)
            }
        table: dict[tuple[int, str], Any] = {}
        for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr]
            mla = MLALayer(self.kv.k[i], layer.self_attn, page, backend=backend)
            table[(i, "mla_mha")] = table[(i, "mla_mqa")] = mla
        return table

    def _attention_backend(self) -> str:
        wanted = self.config.attention_backend
        if wanted == "auto":
            return "triton" if self.device.type == "cuda" else "torch"
        return wanted

    def _graphs_wanted(self) -> bool:
        c = self.config
        if c.disable_piecewise_cuda_graph:
            return False
        return self.device.type == "cuda" or c.emulate_graphs_on_cpu

    def _graph_config(self) -> GraphConfig:
        c = self.config
        return GraphConfig(
            strategy=c.piecewise_cuda_graph_strategy,  # type: ignore[arg-type]
            compiler=c.piecewise_cuda_graph_compiler,  # type: ignore[arg-type]
            max_tokens=c.graph_max_tokens(mla=self.cfg.mla is not None),
            poison_padding=c.debug_poison_padding,
            capture_sizes=c.piecewise_cuda_graph_tokens,
            disable_hint="pass --disable-piecewise-cuda-graph",
        )

    def _capture_graphs(self) -> PiecewiseGraphRunner:
        graph_config = self._graph_config()
        runner = PiecewiseGraphRunner(
            self.model, graph_config, layers=self.layers, capture_metadata=self._capture_metadata
        )
        example = torch.arange(8, device=self.device)
        with torch.no_grad():
            runner.capture([example % self.cfg.vocab_size, example])
        return runner

    def _full_graphs_wanted(self) -> bool:
        c = self.config
        if c.disable_cuda_graph or not (self.device.type == "cuda" or c.emulate_graphs_on_cpu):
            return False
        if self.attention_backend != "triton":
            logger.warning("full CUDA graphs need --attention-backend triton; running without them")
            return False
        return True

    def _capture_full_graphs(self) -> FullGraphRunner | None:
        c = self.config
        # NOTE: MLA layers pick one of two attention paths per batch on the host: an extend graph would
        # freeze the one of its capture batch
        extend_max = c.extend_cuda_graph_max_tokens if self.cfg.mla is None else 0
        # the piecewise graphs' token counts (default or given), up to the extend graphs' limit
        extend = [t for t in self._graph_config().sizes if t <= extend_max]
        shapes = graph_shapes(c.cuda_graph_max_bs, extend, c.extend_cuda_graph_max_seqs)
        if not shapes:
            return None
        # NOTE: the piecewise runner's backend, so both kinds of graph share one memory pool.
        backend = self.graphs.backend if self.graphs is not None else make_backend(self.device)
        assert backend is not None
        runner = FullGraphRunner(
            self.model,
            backend,
            self.layers,
            shapes,
            max_pages_per_seq=-(-self.cfg.max_position_embeddings // self.page_size),
            page_size=self.page_size,
            poison_padding=c.debug_poison_padding,
        )
        runner.capture()
        return runner

    def _capture_metadata(self, num_tokens: int) -> AttentionMetadata:
        """A batch of one sequence of `num_tokens` tokens that lives entirely in the dummy slot: capture
        writes and reads no real sequence's cache."""
        slots = torch.full((num_tokens,), DUMMY_SLOT, dtype=torch.long, device=self.device)
        layout = SeqLayout(num_tokens, num_tokens)
        pages = [[DUMMY_SLOT // self.page_size] * -(-num_tokens // self.page_size)]
        return AttentionMetadata(slots, kernel_layout([layout], pages, self.device), [layout])

    def graph_stats(self) -> dict[str, Any]:
        full = self.full_graphs.replays if self.full_graphs is not None else {"decode": 0, "extend": 0}
        counts = {"decode_graph_replays": full["decode"], "extend_graph_replays": full["extend"]}
        if self.graphs is None:
            return {"mode": "eager", "replays": {}, "eager_fallbacks": {}, **counts}
        return {"mode": "piecewise", **self.graphs.stats.as_dict(), **counts}

    @torch.no_grad()
    def run(self, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Forward `work` (sequence, tokens to run) -> logits [num_seqs, vocab] in float32."""
        batch = build_batch(work, self.pool, self.page_size, self.device)
        logits = self.forward(batch)
        commit(work)
        return logits

    @torch.no_grad()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """One forward of a built batch, through a full graph, piecewise graphs or eagerly. Leaves the
        sequences as they were (a benchmark can replay the same batch)."""
        shape = self.full_graphs.shape_for(batch) if self.full_graphs is not None else None
        if shape is not None:
            hidden = self.full_graphs.run(batch, shape)  # type: ignore[union-attr]
        elif self.graphs is not None:
            hidden = self.graphs(batch.input_ids, batch.positions, metadata=batch.metadata)
        else:
            n = batch.input_ids.shape[0]
            with forward_context(ForwardContext(n, n, batch.metadata, self.layers)):
                hidden = self.model(batch.input_ids, batch.positions)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.pages)
        seq.pages, seq.num_cached = [], 0
