"""Capture hygiene: warm every lazy initialisation before the first capture, keep GC out of it.

A lazy init that first runs *during* stream capture either fails (allocations, handle creation) or
hangs (a library that spawns a subprocess to query the device). So it all happens up front.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from tessera.graphs.platform import is_hip

logger = logging.getLogger("tessera.graphs")

WarmupHook = Callable[[torch.device], None]
_HOOKS: dict[str, WarmupHook] = {}


def register_warmup_hook(name: str, hook: WarmupHook) -> None:
    """Run `hook(device)` once before the first capture (e.g. a kernel library's JIT warm-up)."""
    _HOOKS[name] = hook


def warmup_hooks() -> list[str]:
    return list(_HOOKS)


def run_warmup_hooks(device: torch.device) -> None:
    if device.type != "cuda":
        return
    for name, hook in _HOOKS.items():
        logger.debug("warm-up hook %s", name)
        hook(device)


def rocm_device_env(device: torch.device) -> dict[str, str]:
    """`CU_NUM` / `GPU_ARCHS` as ROCm kernel libraries (aiter) read them. When unset they are found by
    spawning `rocminfo` lazily — which hangs if it first happens inside a graph capture."""
    props = torch.cuda.get_device_properties(device)
    return {
        "CU_NUM": str(props.multi_processor_count),
        "GPU_ARCHS": str(props.gcnArchName).split(":")[0],
    }


def _rocm_env(device: torch.device) -> None:
    if not is_hip():
        return
    for key, value in rocm_device_env(device).items():
        os.environ.setdefault(key, value)


def _device_properties(device: torch.device) -> None:
    torch.cuda.get_device_properties(device)
    torch.cuda.current_stream(device)


def _blas(device: torch.device) -> None:
    # NOTE: creates the cuBLAS/cuBLASLt (hipBLASLt) handles and workspaces for each dtype a model
    # may run in; creating them inside a capture is illegal.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = torch.randn(64, 64, device=device, dtype=dtype)
        (a @ a).sum().item()
        torch.nn.functional.linear(a, a, a[0]).sum().item()


def _triton(device: torch.device) -> None:
    try:
        from triton.runtime import driver
    except ImportError:
        return
    driver.active.get_current_stream(driver.active.get_current_device())


register_warmup_hook("device_properties", _device_properties)
register_warmup_hook("rocm_env", _rocm_env)
register_warmup_hook("blas", _blas)
register_warmup_hook("triton", _triton)


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Collect once, then keep the collector off: a collection mid-capture can free a tensor whose
    memory the graph is using, and scanning a big heap thousands of times costs seconds."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
