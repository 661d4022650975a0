"""How a MoE layer's experts are stored and computed: `ExpertsMethod`, the expert twin of `LinearMethod`.

Experts follow HF's fused layout, gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I],
each quantized (if at all) along its last (input) dim. `tessera.layers.moe.Experts` owns the weights and
calls its method, in order:

    method.create_weights(layer, ExpertShape.for_rank(E, H, I), dtype)
    method.load(layer, name, tensor, expert, part)      # each checkpoint tensor, FULL (unsharded)
    method.process_weights_after_loading(layer)
    out = method.apply(layer, x, topk_weights, topk_ids)   # [T, H]; local ids, -1 rows skipped

`name` is the parameter a checkpoint tensor goes to (the keys of `layer.expert_specs`): HF's fused
`experts.gate_up_proj[_blocks|_scales]` with expert None, or a per-expert `experts.<e>.gate_proj.weight`
(w1) as ("gate_up_proj", e, 0), `up_proj` (w3) part 1, `down_proj` (w2) part None, and its
`weight_scale_inv` / `weight_scale` as "<param>_scale_inv" / "<param>_scale". `load` keeps this rank's
experts (expert parallelism) or its slice of I (tensor parallelism), as `ExpertShape` says.
Plain weights are `tessera.layers.moe.UnquantizedExpertsMethod`; the quantized formats live in
`tessera.quant.moe_methods`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tessera.distributed.state import ep_rank, ep_size, tp_rank, tp_size
from tessera.layers.linear import Loaded, MethodFor, child_name, materialize


@dataclass(frozen=True)
class ExpertShape:
    """This rank's experts: `num_experts` of them from global id `first_expert`, each with the slice
    [intermediate_start, + intermediate_size) of the checkpoint's intermediate dim I."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    first_expert: int = 0
    intermediate_start: int = 0

    @classmethod
    def for_rank(cls, num_experts: int, hidden_size: int, intermediate_size: int) -> ExpertShape:
        """Experts spread over the ranks with expert parallelism, else each one's I split over TP."""
        if ep_size() > 1:
            local = _divide(num_experts, ep_size(), "num_experts")
            return cls(local, hidden_size, intermediate_size, first_expert=ep_rank() * local)
        local = _divide(intermediate_size, tp_size(), "intermediate_size")
        return cls(num_experts, hidden_size, local, intermediate_start=tp_rank() * local)


def _divide(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by {world} ranks")
    return n // world


@dataclass(frozen=True)
class ExpertSpec:
    """Where a parameter's I dim is (in the all-experts tensor; None: it has none), how many values of I
    one stored element covers there, and whether that dim holds [gate; up]."""

    i_dim: int | None
    pack: int = 1
    gate_up: bool = False


GATE_UP = ExpertSpec(1, gate_up=True)  # gate_up rows, one per stored row


class ExpertsMethod(ABC):
    """A format for a MoE layer's experts; see the module docstring for the calling sequence."""

    capture_safe: bool = True  # whether a CUDA graph can capture `apply`

    @abstractmethod
    def create_weights(self, layer: nn.Module, shape: ExpertShape, dtype: torch.dtype) -> None:
        """Register this rank's parameters (via `self._register`)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Quantize or repack once, after every tensor is loaded."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H] through each row's top-k experts -> [T, H]; rows with id -1 are skipped."""

    @abstractmethod
    def dequantize(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) float32, this rank's."""

    def _register_online(self, layer: nn.Module, shape: ExpertShape, dtype: torch.dtype) -> None:
        """bf16/f32 experts to quantize once loaded."""
        e, h, i = shape.num_experts, shape.hidden_size, shape.intermediate_size
        self._register(layer, "gate_up_proj", torch.empty(e, 2 * i, h, dtype=dtype), GATE_UP)
        self._register(layer, "down_proj", torch.empty(e, h, i, dtype=dtype), ExpertSpec(2))

    def _register(self, layer: nn.Module, name: str, data: torch.Tensor, spec: ExpertSpec) -> None:
        if not hasattr(layer, "expert_specs"):
            layer.expert_specs = {}  # parameter name -> ExpertSpec, what `load` slices by
        layer.register_parameter(name, nn.Parameter(data, requires_grad=False))
        layer.expert_specs[name] = spec

    @torch.no_grad()
    def load(
        self, layer: nn.Module, name: str, loaded: Loaded, expert: int | None = None, part: int | None = None
    ) -> bool:
        """Copy this rank's share of a FULL checkpoint tensor (or a lazy one: see `layers.linear`) into
        parameter `name`: all experts (`expert` None, leading dim E) or one (its global id); of a gate_up
        parameter the gate (0) or up (1) half, or both (None). A per-row scale takes a scalar too (a
        per-tensor scale). Returns False for an expert another rank holds."""
        shape: ExpertShape = layer.expert_shape
        spec: ExpertSpec = layer.expert_specs[name]
        dst: torch.Tensor = getattr(layer, name)
        i_dim, scalar = spec.i_dim, math.prod(loaded.shape) == 1
        if expert is not None:
            if not 0 <= expert - shape.first_expert < shape.num_experts:
                return False
            dst = dst[expert - shape.first_expert]
            i_dim = None if i_dim is None else i_dim - 1
        elif not scalar:
            loaded = loaded.narrow(0, shape.first_expert, shape.num_experts)
        if not spec.gate_up or (scalar and part is None):
            pieces: list[tuple[int | None, Loaded]] = [(None, loaded)]
        elif part is None:  # [gate; up] at once: each half sliced on its own
            assert i_dim is not None
            half = loaded.shape[i_dim] // 2
            pieces = [(h, loaded.narrow(i_dim, h * half, half)) for h in (0, 1)]
        else:
            pieces = [(part, loaded)]
        for h, src in pieces:
            _copy(dst, src, i_dim, h, spec.pack, shape, name)
        return True


def _copy(
    dst: torch.Tensor,
    src: Loaded,
    i_dim: int | None,
    half: int | None,
    pack: int,
    shape: ExpertShape,
    name: str,
) -> None:
    """This rank's I slice of `src` into `dst` (its `half` of a gate_up), a scalar broadcast."""
    scalar = math.prod(src.shape) == 1
    if i_dim is not None:
        start, size = shape.intermediate_start, shape.intermediate_size
        if start % pack or size % pack:
            raise ValueError(
                f"experts' {name}: this rank's intermediate slice [{start}, {start + size}) is not "
                f"aligned to the format's {pack}-wide blocks"
            )
        if half is not None:
            dst = dst.narrow(i_dim, half * size // pack, size // pack)
        if not scalar:
            src = src.narrow(i_dim, start // pack, size // pack)
    if not scalar and tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"experts' {name}: this rank's checkpoint slice is {tuple(src.shape)}, the parameter "
            f"holds {tuple(dst.shape)}"
        )
    data = materialize(src)
    dst.copy_(data.reshape(()).expand(dst.shape) if scalar else data)


def expert_loop(
    x: torch.Tensor,
    weights_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    num_experts: int,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The experts as a loop over those that got tokens, `weights_of(e)` giving expert e's (gate_up
    [2I, H], down [H, I]) in x's dtype just for its turn. Pairs with id -1 are never computed."""
    out = torch.zeros_like(x)
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)  # pairs grouped by expert; id -1 sorts first and is cut off
    counts = torch.bincount(flat + 1, minlength=num_experts + 1).tolist()
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if count == 0:
            continue
        picks = order[start : start + count]
        start += count
        rows = picks // topk_ids.shape[1]
        w13, w2 = weights_of(expert)
        gate, up = F.linear(x[rows], w13).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2)
        out.index_add_(0, rows, (y * topk_weights.flatten()[picks, None]).to(out.dtype))
    return out


def experts_method_at(method_for: MethodFor | None, prefix: str) -> ExpertsMethod | None:
    """The format `method_for` picks for the experts of MoE block `prefix` (None: plain weights)."""
    name = child_name(prefix, "experts")
    method = None if method_for is None else method_for(name)
    if method is not None and not isinstance(method, ExpertsMethod):
        raise TypeError(f"{name} are MoE experts; their format is a {type(method).__name__}")
    return method
