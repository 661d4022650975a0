"""The embedding and the LM head with their vocabulary split over the TP ranks.

The vocabulary is padded to a multiple of the TP size and rank r holds rows [r*V_r, (r+1)*V_r) of it
(padding rows zero). The embedding looks up the ids in its range, gives zero rows for the others and
sums over the ranks; the head computes its slice of the logits and gathers the ranks' slices, dropping
the padding columns. With one rank both are plain `F.embedding` / `F.linear` on the full weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.distributed.comm import all_gather, all_reduce, all_reduce_placement
from tessera.distributed.state import tp_group, tp_rank, tp_size
from tessera.layers.linear import Loaded, ShardSpec, materialize, set_shard_spec


class VocabParallelEmbedding(nn.Module):
    """ids [T] -> [T, embedding_dim]; `weight` is this rank's [V_r, embedding_dim] slice."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype | None = None) -> None:
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
        weight = torch.empty(self.rows_per_rank, embedding_dim, dtype=dtype or torch.get_default_dtype())
        self.weight = set_shard_spec(nn.Parameter(weight, requires_grad=False), ShardSpec(0, None))
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.placement = all_reduce_placement()  # NOTE: read once, at build: the graphs are cut by it
        self.loaded = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, D]
        return all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0), self.placement)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: None = None) -> None:
        """Copy this rank's rows of the FULL checkpoint tensor [V, D] into `param`; padding rows zero."""
        if param is not self.weight:
            raise ValueError(
                f"the tensor passed to weight_loader is no parameter of this {type(self).__name__}"
            )
        if tuple(loaded.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"{type(self).__name__}: checkpoint tensor {tuple(loaded.shape)}, expected "
                f"({self.num_embeddings}, {self.embedding_dim})"
            )
        n = self.num_real_rows
        if n:  # (the last rank of a small vocabulary may hold padding only)
            param[:n].copy_(materialize(loaded.narrow(0, self.vocab_start, n)))
        param[n:].zero_()
        self.loaded = True

    def missing_shards(self) -> list[str]:
        return [] if self.loaded else ["weight"]


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [T, D] -> logits [T, V]: this rank's columns, then gathered over the ranks (padding cut)."""

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share `embedding`'s weight (models that tie the head to the embedding)."""
        if embedding.weight.shape != self.weight.shape or embedding.vocab_start != self.vocab_start:
            raise ValueError(
                f"cannot tie a head of {tuple(self.weight.shape)} to an embedding of "
                f"{tuple(embedding.weight.shape)}"
            )
        self.weight = embedding.weight
        self.loaded = True  # what loads the embedding loads the head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if not self.distributed:
            return logits
        return all_gather(logits, dim=-1)[..., : self.num_embeddings]
