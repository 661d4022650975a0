"""Quantized expert formats for MoE layers, each an `ExpertsMethod` (`tessera.layers.expert_format`: the
calling sequence, the names checkpoint tensors load under, how a rank's share is sliced).

MXFP4 runs `tessera::mxfp4_moe_experts` (Triton grouped GEMMs on CUDA, capture-safe). FP8 has no fused
kernel yet: `tessera::fp8_moe_experts` dequantizes, per call, only the experts that got tokens (memory
keeps fp8); it reads per-expert counts on the host, so CUDA graphs cannot capture it (`capture_safe`).
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.graphs import opaque_op
from tessera.layers.expert_format import GATE_UP, ExpertShape, ExpertsMethod, ExpertSpec, expert_loop
from tessera.quant import fp8, mxfp4
from tessera.quant.methods import swap_to_buffers
from tessera.quant.mxfp4_moe import mxfp4_moe_experts


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
        self._register(layer, "gate_up_proj_blocks", torch.empty(e, 2 * i, h // b, b // 2, dtype=u8), GATE_UP)
        self._register(layer, "gate_up_proj_scales", torch.empty(e, 2 * i, h // b, dtype=u8), GATE_UP)
        down = ExpertSpec(2, b)
        self._register(layer, "down_proj_blocks", torch.empty(e, h, i // b, b // 2, dtype=u8), down)
        self._register(layer, "down_proj_scales", torch.empty(e, h, i // b, dtype=u8), down)

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
        self._register(layer, "gate_up_proj", torch.empty(e, 2 * i, h, dtype=f8), GATE_UP)
        self._register(layer, "down_proj", torch.empty(e, h, i, dtype=f8), ExpertSpec(2))
        if self.scheme == "block":
            b = fp8.BLOCK
            _check_i(shape, b, "fp8 block-scaled")
            hb = -(-h // b)
            gate_up = ExpertSpec(1, b, gate_up=True)
            self._register(layer, "gate_up_proj_scale_inv", torch.empty(e, 2 * i // b, hb), gate_up)
            self._register(layer, "down_proj_scale_inv", torch.empty(e, hb, i // b), ExpertSpec(2, b))
        else:
            self._register(layer, "gate_up_proj_scale", torch.empty(e, 2 * i), GATE_UP)
            self._register(layer, "down_proj_scale", torch.empty(e, h), ExpertSpec(None))

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
