"""tessera.distributed: tensor/expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

init_distributed()                 # once per process (torchrun's env, or launch() below)
tp_rank(), tp_size()               # which slice of each sharded layer this process holds
all_reduce(x), all_gather(x)       # graph-runtime ops (an opaque op by default, a split op by flag)
launch(fn, 2, *args)               # fn(rank, 2, *args) in 2 spawned ranks; failures name the rank

With one rank nothing is set up and every collective returns its input.
"""

from tessera.distributed.comm import all_gather, all_reduce, all_reduce_placement, set_all_reduce_placement
from tessera.distributed.launch import WorkerError, launch
from tessera.distributed.state import (
    DEFAULT_TIMEOUT_S,
    ParallelConfig,
    destroy,
    ep_group,
    ep_rank,
    ep_size,
    init_distributed,
    parallel_config,
    tp_group,
    tp_rank,
    tp_size,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ParallelConfig",
    "WorkerError",
    "all_gather",
    "all_reduce",
    "all_reduce_placement",
    "destroy",
    "ep_group",
    "ep_rank",
    "ep_size",
    "init_distributed",
    "launch",
    "parallel_config",
    "set_all_reduce_placement",
    "tp_group",
    "tp_rank",
    "tp_size",
]
