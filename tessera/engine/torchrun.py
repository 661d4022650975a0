"""Tensor parallelism's settings against the machine and the launcher, light enough for the CLI and the
HTTP process (which import no model): the rank torchrun gave this process, the TP size its world
implies, and the GPUs a spawned start needs."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from tessera.engine.config import EngineConfig


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (or another launcher setting WORLD_SIZE > 1) started it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return None


def torchrun_tp(tp: int) -> int:
    """Under torchrun the world is the TP size: `--tp` may be left out (1), or must say the same."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or tp == world:
        return tp
    if tp != 1:
        raise ValueError(f"--tp {tp}, but torchrun started {world} ranks")
    return world


def torchrun_config(config: EngineConfig) -> EngineConfig:
    """`config` with the TP size torchrun's world implies (see `torchrun_tp`)."""
    tp = torchrun_tp(config.tensor_parallel_size)
    return config if tp == config.tensor_parallel_size else replace(config, tensor_parallel_size=tp)


def check_parallel(config: EngineConfig) -> None:
    """What a spawned TP start would trip over late: more ranks than GPUs, one GPU named for all ranks."""
    n = config.tensor_parallel_size
    if n == 1 or config.torch_device.type != "cuda" or torchrun_rank() is not None:
        return
    if config.torch_device.index is not None:
        raise ValueError(f"--device {config.device} with --tp {n}: rank r runs on GPU r, pass --device cuda")
    if n > torch.cuda.device_count():
        raise ValueError(f"--tp {n} needs {n} GPUs (one per rank); {torch.cuda.device_count()} are visible")
