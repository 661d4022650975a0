from __future__ import annotations

import importlib.util
import os

import torch

# NOTE: without a GPU, Triton kernels run in its interpreter; the flag is read when a kernel module
# is imported, so it must be set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out - ref‖ / ‖ref‖ in float64; NaN anywhere is an infinite error."""
    out, ref = out.double(), ref.double()
    if out.isnan().any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
