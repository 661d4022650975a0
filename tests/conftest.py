from __future__ import annotations

import gc
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

# NOTE: without a GPU, Triton kernels run in its interpreter; the flag is read when a kernel module
# is imported, so it must be set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def _share_cores_between_xdist_workers() -> None:
    """Under pytest-xdist (`-n N`), give each worker its share of the cores for torch's intra-op threads,
    and the processes it spawns (engine processes, CLIs, distributed ranks) the same through
    OMP_NUM_THREADS. NOTE: torch's default, one thread per core in every process, puts N x cores
    threads on the cores; an OpenMP barrier then waits for a peer that is descheduled, and the tiny ops
    of these tests ran 10-30x slower on a 2-core machine whenever another process was busy."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 1:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_cores_between_xdist_workers()

# Triton runs CPU tensors only in its interpreter, turned on above only where there is no GPU: the CPU
# engine tests with the triton backend run in CI and are skipped on a GPU machine (its GPU tests cover it).
needs_triton_on_cpu = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU tensors needs triton and its interpreter (TRITON_INTERPRET=1, set without a GPU)",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _give_back_gpu_memory() -> Iterator[None]:
    """After every test on a machine with a GPU (tests not marked `gpu` pick CUDA there too), free what
    it held, so one test cannot starve every test after it of memory: pytest keeps a failed test's frame
    (`sys.last_traceback`, for post-mortem debugging) and with it every engine the test built, an engine's
    reference cycles keep its weights and KV cache until the collector runs, and the caching allocator
    keeps what the test freed. What a test still holds after that is named in a warning."""
    held = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    yield
    if not torch.cuda.is_available():
        return
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            delattr(sys, name)
    gc.collect()
    torch.cuda.empty_cache()
    kept = torch.cuda.memory_allocated() - held
    if kept > 2**30:
        message = f"{kept / 2**30:.1f} GiB of GPU memory still held after the test"
        warnings.warn(message, ResourceWarning, stacklevel=1)  # pytest names the test


def assert_greedy_close(got: Sequence[Any], want: Sequence[Any], max_diverged: int = 1) -> None:
    """Greedy outputs (`RequestOutput`s sampled with `top_logprobs` >= 2) equal token for token, except
    that up to `max_diverged` sequences may part at a near-tie: where they first differ, each side's token
    must be among the other side's two most likely, after which the texts legitimately differ. (bf16
    GEMMs that tile a batch differently round differently; a wrong graph moves far more than a tie.)"""
    diverged = []
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.token_ids == b.token_ids:
            continue
        at = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y), None)
        assert at is not None, (i, "one output is a prefix of the other", a.token_ids, b.token_ids)
        tops_a, tops_b = (dict(o.top_logprobs[at]) for o in (a, b))
        assert b.token_ids[at] in tops_a and a.token_ids[at] in tops_b, (i, at, tops_a, tops_b)
        diverged.append((i, at, tops_a, tops_b))
    assert len(diverged) <= max_diverged, diverged


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out - ref‖ / ‖ref‖ in float64; NaN anywhere is an infinite error."""
    out, ref = out.double(), ref.double()
    if out.isnan().any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
