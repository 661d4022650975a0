"""tessera.graphs: piecewise CUDA graphs for any PyTorch forward. Imports only torch (and tqdm).

runner = PiecewiseGraphRunner(model, GraphConfig(strategy="breakable", max_tokens=512))
runner.capture(example_inputs)      # start-up: warm up and capture every size
out = runner(*inputs)               # pads to the nearest size, replays, slices to real tokens
"""

from tessera.graphs.compile import AddressMismatchError
from tessera.graphs.config import GraphConfig, default_capture_sizes
from tessera.graphs.context import (
    ForwardContext,
    forward_context,
    get_forward_context,
    has_forward_context,
)
from tessera.graphs.hygiene import register_warmup_hook
from tessera.graphs.ops import opaque_op, split_op
from tessera.graphs.runner import CaptureError, PaddingLeakError, PiecewiseGraphRunner
from tessera.graphs.stats import GraphStats, InitReport
from tessera.graphs.watchdog import CaptureTimeoutError

__all__ = [
    "AddressMismatchError",
    "CaptureError",
    "CaptureTimeoutError",
    "ForwardContext",
    "GraphConfig",
    "GraphStats",
    "InitReport",
    "PaddingLeakError",
    "PiecewiseGraphRunner",
    "default_capture_sizes",
    "forward_context",
    "get_forward_context",
    "has_forward_context",
    "opaque_op",
    "register_warmup_hook",
    "split_op",
]
