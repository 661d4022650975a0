"""Expert-weight formats for MoE layers: MXFP4 and FP8 experts, each an `ExpertsMethod`.

Experts follow HF's fused layout, gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I],
each quantized along its last (input) dim. A MoE layer that owns the experts calls, in order:

    method.create_weights(layer, ExpertShape.for_rank(E, H, I), dtype)
    method.load(layer, name, tensor, expert, part)      # each checkpoint tensor, FULL (unsharded)
    method.process_weights_after_loading(layer)
    out = method.apply(layer, x, topk_weights, topk_ids)   # [T, H]; topk_ids -1 rows skipped

`name` is the parameter a checkpoint tensor goes to (the keys of `layer.expert_specs`): HF's fused
`experts.gate_up_proj[_blocks|_scales]` with expert None, or a per-expert `experts.<e>.gate_proj.weight`
(w1) as ("gate_up_proj", e, 0), `up_proj` (w3) part 1, `down_proj` (w2) part None, and its
`weight_scale_inv` / `weight_scale` as "<param>_scale_inv" / "<param>_scale". `load` keeps this rank's
experts (expert parallelism) or its slice of I (tensor parallelism), as `ExpertShape` says.

MXFP4 runs `tessera::mxfp4_moe_experts` (Triton grouped GEMMs on CUDA, capture-safe). FP8 has no fused
kernel yet: `tessera::fp8_moe_experts` dequantizes, per call, only the experts that got tokens (memory
keeps fp8); it reads per-expert counts on the host, so CUDA graphs cannot capture it (`capture_safe`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessera.distributed.state import ep_rank, ep_size, tp_rank, tp_size
from tessera.graphs import opaque_op
from tessera.quant import fp8, mxfp4
from tessera.quant.methods import swap_to_buffers
from tessera.quant.mxfp4_moe import mxfp4_moe_experts

# a checkpoint tensor, or a lazy one (`tessera.layers.linear.LazyTensor`: shape, narrow, materialize)
Loaded = Any


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
class _Spec:
    """Where a parameter's I dim is (in the all-experts tensor; None: it has none), how many values of I
    one stored element covers there, and whether that dim holds [gate; up]."""

    i_dim: int | None
    pack: int = 1
    gate_up: bool = False


_GATE_UP = _Spec(1, gate_up=True)  # gate_up rows, one per stored row


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
        self._register(layer, "gate_up_proj", torch.empty(e, 2 * i, h, dtype=dtype), _GATE_UP)
        self._register(layer, "down_proj", torch.empty(e, h, i, dtype=dtype), _Spec(2))

    def _register(self, layer: nn.Module, name: str, data: torch.Tensor, spec: _Spec) -> None:
        if not hasattr(layer, "expert_specs"):
            layer.expert_specs = {}  # parameter name -> _Spec, what `load` slices by
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
        spec: _Spec = layer.expert_specs[name]
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
    data = src if isinstance(src, torch.Tensor) else src.materialize()
    dst.copy_(data.reshape(()).expand(dst.shape) if scalar else data)


def _check_i(shape: ExpertShape, block: int, fmt: str) -> None:
    if shape.intermediate_size % block:
        raise ValueError(
            f"{fmt} experts: intermediate size {shape.intermediate_size} on this rank is not a multiple of "
            f"the {block}-wide block (gate and up would share a block)"
        )


class Mxfp4ExpertsMethod(ExpertsMethod):
    """MXFP4 experts: gpt-oss's `gate_up_proj_blocks` [E, 2I, H/32, 16] / `_scales` [E, 2I, H/32] and
    `down_proj_blocks` [E, H, I/32, 16] / `_scales` (`checkpoint`), or bf16/f32 `gate_up_proj` /
    `down_proj` quantized once after loading. NOTE: gpt-oss interleaves gate and up rows and adds biases
    and a clamped SwiGLU; this op computes SiLU(gate) * up of [gate; up] without biases."""

    def __init__(self, *, checkpoint: bool = False) -> None:
        self.checkpoint = checkpoint

    def create_weights(self, layer: nn.Module, shape: ExpertShape, dtype: torch.dtype) -> None:
        b = mxfp4.BLOCK_SIZE
        _check_i(shape, b, "MXFP4")
        if shape.hidden_size % b:
            raise ValueError(f"MXFP4 experts: hidden size {shape.hidden_size} is not a multiple of {b}")
        layer.expert_shape = shape
        e, h, i = shape.num_experts, shape.hidden_size, shape.intermediate_size
        if not self.checkpoint:
            self._register_online(layer, shape, dtype)
            return
        u8 = torch.uint8
        self._register(
            layer, "gate_up_proj_blocks", torch.empty(e, 2 * i, h // b, b // 2, dtype=u8), _GATE_UP
        )
        self._register(layer, "gate_up_proj_scales", torch.empty(e, 2 * i, h // b, dtype=u8), _GATE_UP)
        self._register(layer, "down_proj_blocks", torch.empty(e, h, i // b, b // 2, dtype=u8), _Spec(2, b))
        self._register(layer, "down_proj_scales", torch.empty(e, h, i // b, dtype=u8), _Spec(2, b))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.checkpoint:
            w13 = mxfp4.from_checkpoint(layer.gate_up_proj_blocks.data, layer.gate_up_proj_scales.data)
            w2 = mxfp4.from_checkpoint(layer.down_proj_blocks.data, layer.down_proj_scales.data)
        else:
            w13, w2 = mxfp4.quantize(layer.gate_up_proj.data), mxfp4.quantize(layer.down_proj.data)
        swap_to_buffers(layer, list(layer.expert_specs), w13_blocks=w13[0], w13_scales=w13[1],
                        w2_blocks=w2[0], w2_scales=w2[1])  # fmt: skip

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return mxfp4_moe_experts(
            x, layer.w13_blocks, layer.w13_scales, layer.w2_blocks, layer.w2_scales, topk_weights, topk_ids
        )

    def dequantize(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return mxfp4.dequantize(layer.w13_blocks, layer.w13_scales), mxfp4.dequantize(
            layer.w2_blocks, layer.w2_scales
        )


class Fp8ExpertsMethod(ExpertsMethod):
    """FP8 experts, weight-only at run time (see the module docstring). `checkpoint` with "block":
    DeepSeek-V3's fp8 weights and `*_scale_inv` [E, N/128, K/128]; with "per_tensor" / "per_channel":
    `*_scale` per row, which a per-tensor checkpoint scale (a scalar) fills. Otherwise bf16/f32
    `gate_up_proj` / `down_proj` quantized once after loading ("per_tensor" online is per-channel)."""

    capture_safe = False

    def __init__(self, scheme: str = "per_channel", *, checkpoint: bool = False) -> None:
        fp8.act_group(scheme)  # validates the scheme
        self.checkpoint = checkpoint
        self.scheme = "block" if scheme == "block" else "per_channel"  # per-tensor scales live per row

    def create_weights(self, layer: nn.Module, shape: ExpertShape, dtype: torch.dtype) -> None:
        layer.expert_shape = shape
        e, h, i = shape.num_experts, shape.hidden_size, shape.intermediate_size
        if not self.checkpoint:
            self._register_online(layer, shape, dtype)
            return
        f8 = torch.float8_e4m3fn
        self._register(layer, "gate_up_proj", torch.empty(e, 2 * i, h, dtype=f8), _GATE_UP)
        self._register(layer, "down_proj", torch.empty(e, h, i, dtype=f8), _Spec(2))
        if self.scheme == "block":
            b = fp8.BLOCK
            _check_i(shape, b, "fp8 block-scaled")
            hb = -(-h // b)
            self._register(layer, "gate_up_proj_scale_inv", torch.empty(e, 2 * i // b, hb), _Spec(1, b, True))
            self._register(layer, "down_proj_scale_inv", torch.empty(e, hb, i // b), _Spec(2, b))
        else:
            self._register(layer, "gate_up_proj_scale", torch.empty(e, 2 * i), _GATE_UP)
            self._register(layer, "down_proj_scale", torch.empty(e, h), _Spec(None))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        quantized = []
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(layer, proj).data
            if not self.checkpoint:
                q, s = zip(*(fp8.quantize_weight(w[e], self.scheme) for e in range(w.shape[0])), strict=True)
                quantized.append((torch.stack(q), torch.stack(s)))
            else:
                suffix = "_scale_inv" if self.scheme == "block" else "_scale"
                quantized.append(fp8.for_platform(w, getattr(layer, proj + suffix).data.float()))
        (w13, s13), (w2, s2) = quantized
        swap_to_buffers(layer, list(layer.expert_specs), w13=w13, w13_scale=s13, w2=w2, w2_scale=s2)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return fp8_moe_experts(
            x, layer.w13, layer.w13_scale, layer.w2, layer.w2_scale, topk_weights, topk_ids, self.scheme
        )

    def dequantize(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        def each(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return torch.stack([fp8.dequantize_weight(w[e], s[e], self.scheme) for e in range(w.shape[0])])

        return each(layer.w13, layer.w13_scale), each(layer.w2, layer.w2_scale)


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


def _fp8_experts_fake(
    x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, scheme: str,
) -> torch.Tensor:  # fmt: skip
    return torch.empty_like(x)


@opaque_op("tessera::fp8_moe_experts", fake=_fp8_experts_fake)
def fp8_moe_experts(
    x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, scheme: str,
) -> torch.Tensor:  # fmt: skip
    """x [T, H] through the top-k FP8 experts of each row -> [T, H] in x's dtype; each used expert is
    dequantized to x's dtype for its turn only (weight-only FP8)."""

    def weights_of(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            fp8.dequantize_weight(w13[e], w13_scale[e], scheme).to(x.dtype),
            fp8.dequantize_weight(w2[e], w2_scale[e], scheme).to(x.dtype),
        )

    return expert_loop(x, weights_of, w13.shape[0], topk_weights, topk_ids)
