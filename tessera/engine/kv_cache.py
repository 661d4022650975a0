"""The paged KV cache's tensors (the model runner's): fixed-size pages of slots; a token's K/V lives at
`page * page_size + offset`. Which pages belong to whom is the scheduler's business (`kv_manager.py`).

Slot 0 is reserved as the dummy slot: padded tokens of a graph replay write their K/V there, so they
can never overwrite a real sequence's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DUMMY_SLOT = 0


@dataclass
class KVCache:
    """Per layer `[num_slots, num_kv_heads, head_dim]` K and V tensors."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    page_size: int

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        v_head_dim: int | None = None,
    ) -> KVCache:
        """`v_head_dim`: the V cache's width if not head_dim (0 for MLA, whose latent is all in K)."""
        shape = (num_pages * page_size, num_kv_heads, head_dim)
        v_shape = (num_pages * page_size, num_kv_heads, head_dim if v_head_dim is None else v_head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(k=k, v=v, page_size=page_size)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0] // self.page_size
