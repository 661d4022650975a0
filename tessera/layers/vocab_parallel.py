"""The embedding and the LM head with their vocabulary split over the TP ranks, in a pluggable format.

The vocabulary is padded to a multiple of the TP size and rank r holds rows [r*V_r, (r+1)*V_r) of it
(padding rows zero). The embedding looks up the ids in its range, gives zero rows for the others and
sums over the ranks; the head computes its slice of the logits and gathers the ranks' slices, dropping
the padding columns. With one rank both are plain `F.embedding` / `F.linear` on the full weight.

How the rows are stored is a `VocabMethod`'s business, as a linear layer's is its `LinearMethod`'s:
plain rows in the model's dtype here, a GGUF file's blocks in `tessera.quant.methods.GGUFVocabMethod`
(each row is a whole number of blocks, so this rank's rows of the file are a weight of the format). A
head tied to the embedding shares its storage, whatever the format: never a second copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tessera.distributed.comm import all_gather, all_reduce, all_reduce_placement
from tessera.distributed.state import tp_group, tp_rank, tp_size
from tessera.layers.linear import Loaded, ShardSpec, materialize, set_shard_spec

if TYPE_CHECKING:
    from tessera.layers.linear import MethodFor


class VocabMethod(ABC):
    """How a vocabulary table, this rank's rows [V_r, D], is stored and used: the embedding's and the
    head's twin of `LinearMethod`. Called with the layer that holds the rows (for a tied head, the
    embedding)."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """This rank's rows as the checkpoint stores them, [rows, ...]: the layer loads the checkpoint's
        rows into it as its `weight`, and rows of zero bytes (padding) must read as zeros."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Repack once after loading (a kernel's layout); nothing by default."""

    @abstractmethod
    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] in [0, V_r) -> their rows [T, D] in `layer.dtype`."""

    @abstractmethod
    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, D] -> this rank's logits [T, V_r] in hidden's dtype."""

    @abstractmethod
    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """This rank's rows [V_r, D] in float32 (tests, tools)."""


class UnquantizedVocabMethod(VocabMethod):
    """`weight` [V_r, D] in the model's dtype."""

    def create_weights(self, layer: nn.Module, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(rows, dim, dtype=dtype)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, layer.weight)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.float()


def vocab_method_at(method_for: MethodFor | None, name: str) -> VocabMethod | None:
    """The format `method_for` picks for the table `name` ("model.embed_tokens", "lm_head"); None:
    plain rows."""
    method = None if method_for is None else method_for(name)
    if method is not None and not isinstance(method, VocabMethod):
        raise TypeError(f"{name} is a vocabulary table; its format is a {type(method).__name__}")
    return method


class VocabParallelEmbedding(nn.Module):
    """ids [T] -> [T, embedding_dim]; `weight` is this rank's [V_r, ...] slice as `method` stores it
    (plain: [V_r, embedding_dim]; a format may repack it into other tensors after loading)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype | None = None,
        method: VocabMethod | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        # one rank and no process group: the plain embedding and head
        self.distributed = self.tp_size > 1 or tp_group() is not None
        self.padded_num_embeddings = -(-num_embeddings // self.tp_size) * self.tp_size
        self.rows_per_rank = self.padded_num_embeddings // self.tp_size
        self.vocab_start = self.tp_rank * self.rows_per_rank
        # real (not padding) rows this rank holds; the last rank's slice may be short, or even empty
        self.num_real_rows = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        self.dtype = dtype or torch.get_default_dtype()  # the model's: what a lookup returns
        self.method = method or UnquantizedVocabMethod()
        weight = self.method.create_weights(self, self.rows_per_rank, embedding_dim, self.dtype)
        self.weight = set_shard_spec(nn.Parameter(weight, requires_grad=False), ShardSpec(0, None))
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.placement = all_reduce_placement()  # NOTE: read once, at build: the graphs are cut by it
        self.loaded = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(self, input_ids)

    def _lookup(self, table: VocabParallelEmbedding, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] of `table` (this layer or the one it shares rows with), whole: [T, D]."""
        if not self.distributed:
            return self.method.embedding(table, ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = self.method.embedding(table, local.masked_fill(outside, 0))  # [T, D]
        return all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0), self.placement)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: None = None) -> None:
        """Copy this rank's rows of the FULL checkpoint tensor [V, ...] into `param`; padding rows zero."""
        if param is not self.weight:
            raise ValueError(
                f"the tensor passed to weight_loader is no parameter of this {type(self).__name__}"
            )
        want = (self.num_embeddings, *param.shape[1:])
        if tuple(loaded.shape) != want:
            raise ValueError(
                f"{type(self).__name__}: checkpoint tensor {tuple(loaded.shape)}, expected {want}"
            )
        n = self.num_real_rows
        if n:  # (the last rank of a small vocabulary may hold padding only)
            param[:n].copy_(materialize(loaded.narrow(0, self.vocab_start, n)))
        param[n:].zero_()
        self.loaded = True

    def missing_shards(self) -> list[str]:
        return [] if self.loaded else ["weight"]

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def dequantize(self) -> torch.Tensor:
        """This rank's rows [V_r, D] in float32, whatever the format (padding rows zero)."""
        return self.method.dequantize(self)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [T, D] -> logits [T, V]: this rank's columns, then gathered over the ranks (padding cut)."""

    # the embedding whose stored rows a tied head reads, where they are no Parameter it can share
    # (NOTE: in a tuple, so the embedding is not registered a second time, as this head's submodule)
    tied_to: tuple[VocabParallelEmbedding, ...] = ()

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share `embedding`'s rows, in its format (models that tie the head to the embedding): plain
        rows share its `weight` Parameter; a format's tensors, repacked after loading, are read from
        the embedding itself."""
        mine = (self.num_embeddings, self.embedding_dim, self.vocab_start)
        if (embedding.num_embeddings, embedding.embedding_dim, embedding.vocab_start) != mine:
            raise ValueError(
                f"cannot tie a head of {self.num_embeddings} x {self.embedding_dim} (rank {self.tp_rank}) "
                f"to an embedding of {embedding.num_embeddings} x {embedding.embedding_dim} (rank "
                f"{embedding.tp_rank})"
            )
        self.method = embedding.method
        if isinstance(embedding.method, UnquantizedVocabMethod):
            self.weight = embedding.weight
        else:
            del self.weight  # (this head's own, never loaded)
            self.tied_to = (embedding,)
        self.loaded = True  # what loads the embedding loads the head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.method.logits(self._table(), hidden)
        if not self.distributed:
            return logits
        return all_gather(logits, dim=-1)[..., : self.num_embeddings]

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The head's rows of `token_ids` [n] -> [n, D] in the model's dtype, whole on every rank (a
        draft head over part of the vocabulary copies them)."""
        return self._lookup(self._table(), token_ids)

    def process_weights_after_loading(self) -> None:
        if not self.tied_to:  # a tied head's rows are its embedding's, which repacks them
            super().process_weights_after_loading()

    def dequantize(self) -> torch.Tensor:
        return self.method.dequantize(self._table())

    def _table(self) -> VocabParallelEmbedding:
        return self.tied_to[0] if self.tied_to else self
