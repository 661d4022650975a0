"""Host arrays onto the device without the host waiting for the GPU."""

from __future__ import annotations

import numpy as np
import torch


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """`a` on `device`, always a copy. NOTE: a copy from pageable memory waits for the GPU to finish its
    queued work (the copy is staged after it), so every step would wait for the last; a pinned copy is
    queued, and the caching host allocator keeps its buffer until the GPU has read it. On a CPU it is a
    copy too, so the CPU tests see what a GPU does: writes to the device tensor never reach `a`."""
    t = torch.from_numpy(a)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device, copy=True)
