"""FP8 (e4m3) W8A8: weight formats, references, ROCm conversion and the `tessera::fp8_*` ops.

Weights are fp8 [N, K] with float32 scales, `w ~= qweight * scale` (`scale` is a checkpoint's
`weight_scale` / `weight_scale_inv`: it multiplies to dequantize), in one of three schemes:

* "per_tensor":  scale [1]
* "per_channel": scale [N], one per output row
* "block":       scale [ceil(N/128), ceil(K/128)], one per 128x128 block (DeepSeek-V3/R1 checkpoints)

Activations are quantized on the fly with scales of their own rows only: one per token (per_tensor,
per_channel) or one per 1x128 group (block), so a padded row (NaN, 1e30) never changes a real row's
output. On CUDA the GEMM is `torch._scaled_mm` (row-wise scales) or the Triton block GEMM; on a CPU, or
where neither applies, the op dequantizes per call and matmuls in float32 — memory holds only the fp8
weight and its scales either way. ROCm MI300 uses float8_e4m3fnuz (bias 8: the same bits are worth half,
max 240); `to_fnuz` converts an e4m3fn checkpoint tensor.

Decode-sized calls on CUDA (M <= `gemv_kernels.MAX_ROWS` rows) take the weight-streaming GEMM of
`tessera.quant.gemv_kernels` (path "gemv") over the same quantized activations where this card's tuned
table has the weight's shape: the sweep saves one only where it beat the GEMMs above, which the untuned
kernel did not (README, "Quantized weights"). A row's result is the same W8A8 product whatever path its
batch size picks (up to the order of the float32 sums).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable

import torch

from tessera.graphs import is_hip, opaque_op

try:
    from tessera.quant import fp8_kernels, gemv_kernels
except ImportError:  # no Triton: the reference path everywhere
    fp8_kernels = gemv_kernels = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCHEMES = ("per_tensor", "per_channel", "block")
BLOCK = 128
_MIN_AMAX = 1e-12  # an all-zero row/block gets a tiny positive scale, not a division by zero
# which GEMM path each fp8_linear call took (a graph replay counts once, at capture)
path_counts: Counter[str] = Counter()


def fp8_dtype() -> torch.dtype:
    """The platform's e4m3 type: float8_e4m3fnuz on ROCm (MI300), float8_e4m3fn elsewhere."""
    return torch.float8_e4m3fnuz if is_hip() else torch.float8_e4m3fn


def fp8_max(dtype: torch.dtype | None = None) -> float:
    """Largest finite value of `dtype` (default the platform's): 448 for e4m3fn, 240 for e4m3fnuz."""
    return torch.finfo(dtype or fp8_dtype()).max


def act_group(scheme: str) -> int:
    """Activation scale group along K: 0 = one scale per token, else 1 x BLOCK groups."""
    _check_scheme(scheme)
    return BLOCK if scheme == "block" else 0


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown fp8 scheme {scheme!r}: one of {', '.join(SCHEMES)}")


def _cast(scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # NOTE: clamp first: a float -> fp8 cast of an out-of-range value is not guaranteed to saturate
    fmax = fp8_max(dtype)
    return scaled.clamp(-fmax, fmax).to(dtype)


def _blocked(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] zero-padded to whole blocks, viewed [N/B, B, K/B, B]."""
    n, k = w.shape
    pad_n, pad_k = -n % BLOCK, -k % BLOCK
    w = torch.nn.functional.pad(w, (0, pad_k, 0, pad_n))
    return w.view((n + pad_n) // BLOCK, BLOCK, (k + pad_k) // BLOCK, BLOCK)


def _expand_blocks(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Block scales [N/B, K/B] -> one per element [N, K]."""
    return scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]


def quantize_weight(
    w: torch.Tensor, scheme: str, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight fp8 [N, K], scale float32) of a bf16/fp32 weight [N, K] (online quantization): each
    scale is its tensor's/row's/block's amax over the format's max. `dtype` defaults to the platform's."""
    _check_scheme(scheme)
    dtype = dtype or fp8_dtype()
    fmax = fp8_max(dtype)
    w = w.float()
    n, k = w.shape
    if scheme == "per_tensor":
        scale = (w.abs().amax().clamp_min(_MIN_AMAX) / fmax).reshape(1)
        return _cast(w / scale, dtype), scale
    if scheme == "per_channel":
        scale = w.abs().amax(1).clamp_min(_MIN_AMAX) / fmax  # [N]
        return _cast(w / scale[:, None], dtype), scale
    blocks = _blocked(w)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(_MIN_AMAX) / fmax  # [N/B, K/B]
    q = _cast(blocks / scale[:, None, :, None], dtype).flatten(0, 1).flatten(1, 2)
    return q[:n, :k].contiguous(), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """Reference: float32 [N, K] = qweight * its scale."""
    _check_scheme(scheme)
    q = qweight.float()
    if scheme == "per_tensor":
        return q * scale.float().reshape(())
    if scheme == "per_channel":
        return q * scale.float().reshape(-1, 1)
    return q * _expand_blocks(scale.float(), *q.shape)


def quantize_act_reference(
    x: torch.Tensor, group: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of the activation quantizer: (q [M, K], scale float32 [M, G]) with G = 1 per
    token (group 0) or ceil(K / group) groups, scale = amax / max of its group."""
    dtype = dtype or fp8_dtype()
    rows, k = x.shape
    group = group or max(k, 1)
    xf = torch.nn.functional.pad(x.float(), (0, -k % group)).view(rows, -1, group)
    scale = xf.abs().amax(-1).clamp_min(_MIN_AMAX) / fp8_max(dtype)  # [M, G]; NaN stays in its row
    q = _cast(xf / scale[..., None], dtype).flatten(1)[:, :k]
    return q.contiguous(), scale


def dequantize_act(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """float32 [M, K] from an activation quantizer's (q, scale [M, G]) for the same `group`."""
    if group == 0:
        return q.float() * scale
    return q.float() * scale.repeat_interleave(group, 1)[:, : q.shape[1]]


def to_fnuz(qweight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An e4m3fn tensor and its scales as e4m3fnuz (ROCm MI300), dequantizing to the same values: the
    same bits, worth half under fnuz's exponent bias 8, so the scale doubles; 0x80 (fn's -0, fnuz's
    NaN) becomes +0."""
    if qweight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"to_fnuz expects float8_e4m3fn, got {qweight.dtype}")
    bits = qweight.view(torch.int8)
    bits = torch.where(bits == -128, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), scale * 2


def for_platform(qweight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's e4m3fn (qweight, scale) in the platform's type (converted on ROCm only)."""
    if is_hip() and qweight.dtype == torch.float8_e4m3fn:
        return to_fnuz(qweight, scale)
    return qweight, scale


def _quantize_act_fake(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[1]
    groups = 1 if group == 0 else -(-k // group)
    return x.new_empty(x.shape, dtype=fp8_dtype()), x.new_empty((x.shape[0], groups), dtype=torch.float32)


@opaque_op("tessera::fp8_quantize_act", fake=_quantize_act_fake)
def quantize_act(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q fp8 [M, K], scale float32 [M, G]) of x [M, K]: one scale per token (group 0) or per 1 x
    `group` slice of a row (Triton on GPUs, the torch reference elsewhere)."""
    if x.is_cuda and triton_fp8(x.device):
        return fp8_kernels.quantize_act(x.contiguous(), group, fp8_dtype())
    return quantize_act_reference(x, group)


def _reference_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str, bias: torch.Tensor | None
) -> torch.Tensor:
    group = act_group(scheme)
    xq, xs = quantize_act_reference(x, group, qweight.dtype)
    out = dequantize_act(xq, xs, group) @ dequantize_weight(qweight, scale, scheme).T
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def _rowwise_v1(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def _rowwise_v2(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    from torch.nn.functional import ScalingType, scaled_mm  # torch >= 2.10

    rowwise = ScalingType.RowWise
    return scaled_mm(a, b, sa, rowwise, sb, rowwise, output_dtype=torch.bfloat16)


RowwiseMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


_ROWWISE: dict[torch.device, RowwiseMM | None] = {}


def _rowwise_mm(device: torch.device) -> RowwiseMM | None:
    """The row-wise scaled mm for `device`, probed on first use. NOTE: the probe syncs, so a graph
    capture that comes before any eager call (no warm-up) runs the reference instead of probing."""
    if device not in _ROWWISE:
        if torch.cuda.is_current_stream_capturing():
            return None
        _ROWWISE[device] = _probe_rowwise_mm(device)
    return _ROWWISE[device]


def _probe_rowwise_mm(device: torch.device) -> RowwiseMM | None:
    """The first row-wise scaled-mm API that runs and is right on `device` (probed once with a tiny
    GEMM), or None: `torch._scaled_mm` (torch 2.5+, kept for compatibility after 2.10), then
    `torch.nn.functional.scaled_mm` (2.10+). Row-wise scaling needs SM89+/MI300 and a recent build."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 64, generator=gen), torch.randn(32, 64, generator=gen)
    xq, xs = quantize_act_reference(x, 0)
    wq, ws = quantize_weight(w, "per_channel")
    ref = dequantize_act(xq, xs, 0) @ dequantize_weight(wq, ws, "per_channel").T
    args = (xq.to(device), wq.to(device).t(), xs.to(device), ws.to(device).view(1, -1))
    for fn in (_rowwise_v1, _rowwise_v2):
        try:
            out = fn(*args).float().cpu()
        except (RuntimeError, TypeError, AttributeError, ImportError, ValueError, NotImplementedError) as e:
            log.info("fp8 row-wise %s unavailable: %s", fn.__name__, e)
            continue
        if ((out - ref).norm() / ref.norm()).item() < 1e-2:
            return fn
        log.warning("fp8 row-wise %s gives wrong results on %s; not used", fn.__name__, device)
    log.warning("no fp8 row-wise scaled mm on %s: fp8 linears dequantize per call", device)
    return None


def _scaled_mm_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, mm: RowwiseMM
) -> torch.Tensor:
    n = qweight.shape[0]
    xq, xs = quantize_act(x, 0)  # [M, K], [M, 1]
    ws = scale.float().reshape(1, -1).expand(1, n).contiguous()  # per_tensor broadcasts to [1, N]
    out = mm(xq, qweight.t(), xs, ws)  # qweight.t(): column-major [K, N], as cuBLASLt wants
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)


@functools.cache
def triton_fp8(device: torch.device) -> bool:
    """Whether Triton kernels can hold fp8 values on `device`: ROCm, or CUDA from SM89 (Ada, Hopper) on."""
    return fp8_kernels is not None and (is_hip() or torch.cuda.get_device_capability(device) >= (8, 9))


def _gemm(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] -> [M, N]. The path depends only on devices, shapes and the scheme, never on values, so
    every captured batch size takes the one it took at capture."""
    n, k = qweight.shape
    if not x.is_cuda or x.shape[0] == 0:
        path_counts["reference"] += 1
        return _reference_linear(x, qweight, scale, scheme, bias)
    if qweight.dtype != fp8_dtype():
        raise TypeError(f"fp8 weight is {qweight.dtype}, this platform runs {fp8_dtype()}: see for_platform")
    if not triton_fp8(x.device):
        path_counts["reference"] += 1
        return _reference_linear(x, qweight, scale, scheme, bias)
    if (
        gemv_kernels is not None
        and x.shape[0] <= gemv_kernels.MAX_ROWS
        and gemv_kernels.fp8_tuned(x.device, scheme, n, k)
        and gemv_kernels.usable(x.device, "fp8")
    ):
        path_counts["gemv"] += 1
        xq, xs = quantize_act(x, act_group(scheme))
        return gemv_kernels.fp8_gemv(xq, xs, qweight, scale, scheme, x.dtype, bias)
    if scheme == "block" and fp8_kernels is not None:
        path_counts["triton_block"] += 1
        xq, xs = quantize_act(x, BLOCK)
        return fp8_kernels.block_gemm(xq, xs, qweight, scale.float().contiguous(), bias, x.dtype)
    mm = _rowwise_mm(x.device) if scheme != "block" and n % 16 == 0 and k % 16 == 0 else None
    if mm is None:
        path_counts["reference"] += 1
        return _reference_linear(x, qweight, scale, scheme, bias)
    path_counts["scaled_mm"] += 1
    return _scaled_mm_linear(x, qweight, scale, bias, mm)


def _linear_fake(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@opaque_op("tessera::fp8_linear", fake=_linear_fake)
def _fp8_linear_op(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, scheme: str, bias: torch.Tensor | None
) -> torch.Tensor:
    _check_scheme(scheme)
    k = x.shape[-1]
    out = _gemm(x.reshape(-1, k).contiguous(), qweight, scale, scheme, bias)
    return out.view(*x.shape[:-1], qweight.shape[0])


def fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    scheme: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W.T (+ bias) with W = qweight fp8 [N, K] * scale (see the module
    docstring for the schemes), activations quantized per token / per 1x128 group; out in x's dtype."""
    return _fp8_linear_op(x, qweight, scale, scheme, bias)
