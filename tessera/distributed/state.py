"""Who this process is among the tensor-parallel ranks: the parallel config and the process group.

Every rank holds one slice of each sharded layer; `tp_rank()` / `tp_size()` say which. With one rank
nothing is initialised at all (no process group, no env variables read), so single-GPU code paths stay
exactly what they were: layers ask `tp_size()` and see 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ParallelConfig:
    """`tp` ranks shard attention and dense layers; `ep` is 1 (every rank holds every expert, sharded
    along the intermediate dim like a dense MLP) or `tp` (experts spread over those same ranks, as with
    SGLang's `--ep-size` equal to the TP size)."""

    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.ep not in (1, self.tp):
            raise ValueError(
                f"ep must be 1 or equal to tp={self.tp} (experts are spread over the TP ranks), got {self.ep}"
            )

    @property
    def world_size(self) -> int:
        return self.tp


@dataclass(frozen=True)
class _State:
    config: ParallelConfig
    rank: int
    group: dist.ProcessGroup | None  # None with one rank: no process group exists


_SINGLE = _State(ParallelConfig(), 0, None)
_state = _SINGLE


def init_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    init_method: str | None = None,
    *,
    ep: int = 1,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    local_rank: int | None = None,
    group_of_one: bool = False,
) -> ParallelConfig:
    """Join the TP process group (one per process). Unset arguments come from torchrun's environment
    (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT` via `env://`), else a single rank.

    `backend` defaults to nccl where CUDA is available and gloo elsewhere; on nccl the process binds to
    GPU `local_rank`. `timeout_s` bounds every collective, so a rank that died turns into an error on the
    others rather than a hang. World size 1 creates no process group, unless `group_of_one`: then the
    collectives run over a group of one rank (the parallel path on one GPU, for its tests).
    """
    global _state
    if _state.group is not None:
        raise RuntimeError("init_distributed was already called in this process: call destroy() first")
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    config = ParallelConfig(tp=world_size, ep=ep)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if world_size == 1 and not group_of_one:
        _state = _State(config, 0, None)
        return config
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device_id = None
    if backend == "nccl":
        local_rank = _env_int("LOCAL_RANK", rank) if local_rank is None else local_rank
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)  # binds the communicator to this GPU eagerly
    dist.init_process_group(
        backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device_id,
    )
    _state = _State(config, rank, dist.group.WORLD)
    return config


def destroy() -> None:
    """Leave the process group (if any) and go back to a single rank."""
    global _state
    if _state.group is not None and dist.is_initialized():
        dist.destroy_process_group()
    _state = _SINGLE


@contextmanager
def as_rank(rank: int, tp: int, ep: int = 1) -> Iterator[None]:
    """Build layers as rank `rank` of `tp` (experts over `ep`) would, in this process and with no
    process group: building and loading read only the rank (tests, and tools that reshard weights)."""
    global _state
    previous = _state
    _state = _State(ParallelConfig(tp=tp, ep=ep), rank, None)
    try:
        yield
    finally:
        _state = previous


def parallel_config() -> ParallelConfig:
    return _state.config


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.config.tp


def tp_group() -> dist.ProcessGroup | None:
    """The TP ranks' process group (all ranks: TP is the only dimension); None with one rank."""
    return _state.group


def ep_rank() -> int:
    return _state.rank if _state.config.ep > 1 else 0


def ep_size() -> int:
    return _state.config.ep


def ep_group() -> dist.ProcessGroup | None:
    """The group experts are spread over: the TP group when ep == tp, None when every rank has them all."""
    return _state.group if _state.config.ep > 1 else None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)
