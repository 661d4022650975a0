"""tessera.graphs: piecewise CUDA graphs for any PyTorch forward. Imports only torch and tqdm, and
nothing else of tessera.

runner = PiecewiseGraphRunner(model, GraphConfig(strategy="breakable", max_tokens=512))
runner.capture(example_inputs)      # start-up: warm up and capture every size
out = runner(*inputs)               # pads to the nearest size, replays, slices to real tokens

`FullGraphRunner` is the other strategy: whole forwards as one graph each, over static buffers its caller
owns. A dispatcher picks between them with one `BatchDescriptor` (mode, padded size) per step.
"""

from tessera.graphs.compile import AddressMismatchError
from tessera.graphs.config import GraphConfig, default_capture_sizes
from tessera.graphs.context import (
    ForwardContext,
    current_forward_context,
    forward_context,
    get_forward_context,
    has_forward_context,
)
from tessera.graphs.dispatch import BatchDescriptor, GraphMode
from tessera.graphs.full import FullGraphRunner
from tessera.graphs.hygiene import frozen_gc, register_warmup_hook
from tessera.graphs.ops import opaque_op, split_op
from tessera.graphs.platform import Graph, GraphBackend, is_hip, make_backend, platform_name
from tessera.graphs.runner import CaptureError, PaddingLeakError, PiecewiseGraphRunner, changed_rows
from tessera.graphs.stats import DISABLED, OVERSIZE, RECOMPILE, UNCAPTURED, GraphStats, InitReport
from tessera.graphs.watchdog import CaptureTimeoutError

__all__ = [
    "DISABLED",
    "OVERSIZE",
    "RECOMPILE",
    "UNCAPTURED",
    "AddressMismatchError",
    "BatchDescriptor",
    "CaptureError",
    "CaptureTimeoutError",
    "ForwardContext",
    "FullGraphRunner",
    "Graph",
    "GraphBackend",
    "GraphConfig",
    "GraphMode",
    "GraphStats",
    "InitReport",
    "PaddingLeakError",
    "PiecewiseGraphRunner",
    "changed_rows",
    "current_forward_context",
    "default_capture_sizes",
    "forward_context",
    "frozen_gc",
    "get_forward_context",
    "has_forward_context",
    "is_hip",
    "make_backend",
    "opaque_op",
    "platform_name",
    "register_warmup_hook",
    "split_op",
]
