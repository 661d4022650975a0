"""Quantized weight formats as `LinearMethod`s: FP8 (W8A8), MXFP4 and GGUF (weight-only); GGUF also as a
`VocabMethod`, for the embedding and the LM head.

Each method registers the checkpoint's own tensors, named as the checkpoint names them, with a
`ShardSpec`, so `LinearBase.weight_loader` slices them for any parallel layer at any TP size; once
loaded, `process_weights_after_loading` turns them into the kernel's layout (kept as non-persistent
buffers: they load nothing, so `missing_shards` never asks for them) and `apply` calls the format's
opaque op. Nothing is a tensor subclass. A block (or a packed byte) never straddles two ranks or two
fused parts: such a layer fails when it is built, naming the sizes.

| method                  | checkpoint parameters (this rank's)                        | kernel tensors      |
|-------------------------|------------------------------------------------------------|---------------------|
| Fp8 "per_tensor", ckpt  | weight fp8 [N, K], weight_scale [parts]                    | qweight, qscale [N] |
| Fp8 "per_channel", ckpt | weight fp8 [N, K], weight_scale [N]                        | qweight, qscale [N] |
| Fp8 "block", ckpt       | weight fp8 [N, K], weight_scale_inv [N/128, K/128]         | qweight, qscale     |
| Fp8 / Mxfp4 online      | weight [N, K] in the model dtype, quantized once           | qweight, qscale     |
| Mxfp4 ckpt              | weight_blocks u8 [N, K/32, 16], weight_scales u8 [N, K/32] | qweight, qscale     |
| GGUF                    | weight u8 [N, K/B, block bytes] (`gguf_blocks(raw)`)       | gguf_<part>         |
| GGUF embedding / head   | weight u8 [V_r, D/B, block bytes], this rank's rows        | gguf_<part>         |

NOTE: build quantized models in their dtype and move them with `.to(device)` only: `Module.to(dtype)`
casts every floating-point tensor, fp8 weights and float32 scales included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from tessera.layers.linear import LinearMethod, ShardSpec, set_shard_spec
from tessera.layers.vocab_parallel import VocabMethod
from tessera.quant import fp8, gguf, mxfp4

log = logging.getLogger(__name__)

FP8_CHECKPOINT_DTYPE = torch.float8_e4m3fn  # what checkpoints hold; ROCm converts after loading


def register(layer: nn.Module, name: str, data: torch.Tensor, spec: ShardSpec) -> None:
    """A loadable parameter (never trained) with its ShardSpec."""
    param = nn.Parameter(data, requires_grad=False)
    layer.register_parameter(name, set_shard_spec(param, spec))


def swap_to_buffers(layer: nn.Module, drop: Sequence[str], **tensors: torch.Tensor) -> None:
    """Replace the checkpoint-layout parameters `drop` by the kernel's `tensors`."""
    for name in drop:
        delattr(layer, name)
    for name, tensor in tensors.items():
        layer.register_buffer(name, tensor, persistent=False)


def check_blocks(layer: nn.Module, out_block: int, in_block: int, fmt: str, *, tails: bool) -> None:
    """Fail at build when a block of `out_block` x `in_block` would straddle two fused parts or two
    ranks. `tails`: a partial last block is fine where nothing follows it (the end of an unsplit dim)."""
    where = f"{fmt} {type(layer).__name__}"
    split_out = layer.out_features != layer.output_size
    sizes = layer.output_sizes
    for i, size in enumerate(sizes):
        last_whole = i == len(sizes) - 1 and not split_out
        if size % out_block and not (tails and last_whole):
            raise ValueError(
                f"{where}: fused part {i} holds {size} output rows on this rank (TP {layer.tp_size}), "
                f"not a multiple of the {out_block}-row block; a block would straddle two parts or ranks"
            )
    split_in = layer.in_features != layer.input_size
    if layer.in_features % in_block and (split_in or not tails):
        raise ValueError(
            f"{where}: {layer.in_features} input features on this rank (of {layer.input_size}, TP "
            f"{layer.tp_size}) are not a multiple of the format's {in_block}-wide block"
        )


class Fp8LinearMethod(LinearMethod):
    """FP8 e4m3 weights; activations quantized at every call with scales of their own rows (one per
    token, or per 1x128 group for "block"), so padded rows never reach real ones.

    `checkpoint`: the weights arrive in fp8 with their scales (table above); otherwise a bf16/f32
    `weight` is quantized once after loading. `static_input_scale`: the checkpoint also holds a
    calibrated `input_scale` per part; it is loaded (so loading stays generic) but not used: the
    dynamic per-token scales bound each row's error by its own amax, at least as tight as one scale
    for all rows. e4m3fn checkpoints become e4m3fnuz on ROCm (`fp8.for_platform`)."""

    def __init__(
        self, scheme: str = "per_channel", *, checkpoint: bool = False, static_input_scale: bool = False
    ) -> None:
        fp8.act_group(scheme)  # validates the scheme
        if static_input_scale and not checkpoint:
            raise ValueError("a static input scale comes from a checkpoint: online fp8 is dynamic")
        self.scheme, self.checkpoint, self.static_input_scale = scheme, checkpoint, static_input_scale

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        if not self.checkpoint:
            register(layer, "weight", torch.empty(out_features, in_features, dtype=dtype), ShardSpec())
            return
        weight = torch.empty(out_features, in_features, dtype=FP8_CHECKPOINT_DTYPE)
        register(layer, "weight", weight, ShardSpec())
        parts = len(layer.output_sizes)
        if self.scheme == "block":
            b = fp8.BLOCK
            check_blocks(layer, b, b, "fp8 block-scaled", tails=True)
            scale = torch.empty(-(-out_features // b), -(-in_features // b), dtype=torch.float32)
            register(layer, "weight_scale_inv", scale, ShardSpec(0, 1, b, b))
        elif self.scheme == "per_channel":
            register(layer, "weight_scale", torch.empty(out_features), ShardSpec(0, None))
        else:
            register(layer, "weight_scale", torch.empty(parts), ShardSpec(None, None, per_shard=True))
        if self.static_input_scale:
            register(layer, "input_scale", torch.empty(parts), ShardSpec(None, None, per_shard=True))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        drop = [n for n in ("weight", "weight_scale", "weight_scale_inv", "input_scale") if hasattr(layer, n)]
        if not self.checkpoint:
            qweight, scale = fp8.quantize_weight(layer.weight.data, self.scheme)
            layer.quant_scheme = self.scheme
        elif self.scheme == "block":
            qweight, scale = layer.weight.data, layer.weight_scale_inv.data
            layer.quant_scheme = "block"
        else:
            # NOTE: per-part scales become per-row scales instead of requantizing every part to the
            # largest (vLLM's way): the row-wise GEMM takes one scale per output row anyway
            # (`fp8._scaled_mm_linear` broadcasts a per-tensor scale to [1, N]), so this costs 4 bytes a
            # row and no second rounding of the weights.
            scale = layer.weight_scale.data
            if self.scheme == "per_tensor":
                sizes = torch.tensor(layer.output_sizes, device=scale.device)
                scale = scale.repeat_interleave(sizes)
            qweight = layer.weight.data
            layer.quant_scheme = "per_channel"
        qweight, scale = fp8.for_platform(qweight, scale.float())
        swap_to_buffers(layer, drop, qweight=qweight.contiguous(), qscale=scale.contiguous())
        gemv = fp8.gemv_kernels
        if (
            qweight.is_cuda
            and gemv is not None
            and fp8.triton_fp8(qweight.device)
            and gemv.fp8_tuned(qweight.device, layer.quant_scheme, *qweight.shape)
        ):
            gemv.usable(qweight.device, "fp8")  # now, before any graph capture asks (tuned shapes only)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8.fp8_linear(x, layer.qweight, layer.qscale, layer.quant_scheme, bias)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """This rank's weight, float32 [out, in] (MLA's absorbed projections, tests)."""
        return fp8.dequantize_weight(layer.qweight, layer.qscale, layer.quant_scheme)


class Mxfp4LinearMethod(LinearMethod):
    """MXFP4 weights (e2m1 values, one e8m0 scale per 32 inputs), activations kept in their dtype.

    `checkpoint`: `weight_blocks` / `weight_scales` in the gpt-oss / HF layout (`mxfp4.from_checkpoint`);
    otherwise a bf16/f32 `weight` quantized once after loading. The input features of every rank must be
    a multiple of 32."""

    def __init__(self, *, checkpoint: bool = False) -> None:
        self.checkpoint = checkpoint

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        b = mxfp4.BLOCK_SIZE
        check_blocks(layer, 1, b, "MXFP4", tails=False)
        if not self.checkpoint:
            register(layer, "weight", torch.empty(out_features, in_features, dtype=dtype), ShardSpec())
            return
        blocks = torch.empty(out_features, in_features // b, b // 2, dtype=torch.uint8)
        register(layer, "weight_blocks", blocks, ShardSpec(0, 1, 1, b))
        scales = torch.empty(out_features, in_features // b, dtype=torch.uint8)
        register(layer, "weight_scales", scales, ShardSpec(0, 1, 1, b))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.checkpoint:
            blocks, scales = mxfp4.from_checkpoint(layer.weight_blocks.data, layer.weight_scales.data)
            drop = ["weight_blocks", "weight_scales"]
        else:
            blocks, scales = mxfp4.quantize(layer.weight.data)
            drop = ["weight"]
        swap_to_buffers(layer, drop, qweight=blocks, qscale=scales)
        if blocks.is_cuda and mxfp4.gemv_kernels is not None:
            mxfp4.gemv_kernels.usable(blocks.device, "mxfp4")  # now, before any graph capture asks

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return mxfp4.mxfp4_linear(x, layer.qweight, layer.qscale, bias)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return mxfp4.dequantize(layer.qweight, layer.qscale)


def gguf_blocks(raw: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """A GGUF tensor's bytes uint8 [rows, bytes per row] (`GGUFFile.raw_tensors`) as the checkpoint
    tensor `GGUFLinearMethod` loads, [rows, blocks, block bytes]: a view, so its input dim can be
    sliced in whole blocks."""
    return raw.view(raw.shape[0], -1, gguf.FORMATS[ggml_type].block_bytes)


class GGUFLinearMethod(LinearMethod):
    """GGUF block-quantized weights of one ggml type, repacked once after loading (`gguf.repack`) and
    multiplied by `tessera::gguf_linear`. A fused layer's parts must share the type (`QuantConfig`
    builds layers whose parts differ unquantized, their weights dequantized by the loader)."""

    def __init__(self, ggml_type: str) -> None:
        if ggml_type not in gguf.FORMATS:
            raise ValueError(f"GGUF type {ggml_type!r} has no kernels (supported: {sorted(gguf.FORMATS)})")
        self.ggml_type = ggml_type
        self.format = gguf.FORMATS[ggml_type]

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        fmt = self.format
        check_blocks(layer, 1, fmt.block, f"GGUF {fmt.name}", tails=False)
        raw = torch.empty(out_features, in_features // fmt.block, fmt.block_bytes, dtype=torch.uint8)
        register(layer, "weight", raw, ShardSpec(0, 1, 1, fmt.block))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _repack_gguf(layer, self.format, layer.in_features)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _gguf_matmul(x, _gguf_parts(layer, self.format), self.ggml_type, layer.in_features)
        return y if bias is None else y + bias

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return gguf.dequantize(_gguf_weight(layer, self.format, layer.in_features))


class GGUFVocabMethod(VocabMethod):
    """An embedding or LM head in a GGUF file's blocks. Blocks run along the embedding dim, so each row is
    its own blocks and this rank's rows of the file's bytes are a GGUF weight of their own: loaded raw
    ([V_r, D/B, block bytes], padding rows zero bytes: zero scales, zero values), repacked once like a
    linear layer's (`gguf.repack`). A lookup gathers only the asked rows' parts and dequantizes them (no
    dense table ever exists, on any device); the head multiplies with `tessera::gguf_linear`, opaque in
    the graph pieces as every GGUF linear layer's."""

    def __init__(self, ggml_type: str) -> None:
        if ggml_type not in gguf.FORMATS:
            raise ValueError(f"GGUF type {ggml_type!r} has no kernels (supported: {sorted(gguf.FORMATS)})")
        self.ggml_type = ggml_type
        self.format = gguf.FORMATS[ggml_type]

    def create_weights(self, layer: nn.Module, rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        fmt = self.format
        if dim % fmt.block:
            raise ValueError(
                f"GGUF {fmt.name} {type(layer).__name__}: embedding dim {dim} is not a multiple of the "
                f"format's {fmt.block}-wide block"
            )
        return torch.empty(rows, dim // fmt.block, fmt.block_bytes, dtype=torch.uint8)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _repack_gguf(layer, self.format, layer.embedding_dim)

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        rows = tuple(p.index_select(0, ids) for p in _gguf_parts(layer, self.format))  # [T, ...] each
        w = gguf.GGUFWeight(self.ggml_type, (ids.shape[0], layer.embedding_dim), rows)
        return gguf.dequantize(w, layer.dtype)  # [T, D]

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return _gguf_matmul(hidden, _gguf_parts(layer, self.format), self.ggml_type, layer.embedding_dim)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return gguf.dequantize(_gguf_weight(layer, self.format, layer.embedding_dim))


def _repack_gguf(layer: nn.Module, fmt: gguf.GGUFFormat, k: int) -> None:
    """`layer.weight`, raw blocks [N, K/B, block bytes], swapped for the repacked parts `gguf_<part>`."""
    raw = layer.weight.data
    w = gguf.repack(raw.reshape(raw.shape[0], -1), fmt.name, (raw.shape[0], k))
    parts = {f"gguf_{name}": t for name, t in zip(fmt.parts, w.parts, strict=True)}
    swap_to_buffers(layer, ["weight"], **parts)


def _gguf_parts(layer: nn.Module, fmt: gguf.GGUFFormat) -> list[torch.Tensor]:
    return [getattr(layer, f"gguf_{name}") for name in fmt.parts]


def _gguf_weight(layer: nn.Module, fmt: gguf.GGUFFormat, k: int) -> gguf.GGUFWeight:
    parts = tuple(_gguf_parts(layer, fmt))
    return gguf.GGUFWeight(fmt.name, (parts[0].shape[0], k), parts)


def _gguf_matmul(x: torch.Tensor, parts: list[torch.Tensor], ggml_type: str, k: int) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] (`tessera::gguf_linear`, the parts passed as they are: no
    `GGUFWeight` is built inside a traced forward)."""
    y = torch.ops.tessera.gguf_linear(x.reshape(-1, k), parts, ggml_type)
    return y.view(*x.shape[:-1], y.shape[-1])
