"""GGUF block-quantized weights kept in their bits: formats, a one-time repack, the torch reference, the op.

A GGUF file stores each row of a weight [N, K] as K / B blocks, each block its scales then its quantized
values interleaved. `repack` splits those into a struct of arrays of the very same bytes (`nbytes` equals
the file's), so a GEMM loads each part with plain row-major, K-contiguous tiles:

=====  =====  ==========================================================================================
type   B      parts (all row-major, one row per output feature)
=====  =====  ==========================================================================================
Q8_0   32     qs int8 [N, K];      d fp16 [N, K/32]                               w = q * d
Q4_0   32     qs uint8 [N, K/2];   d fp16 [N, K/32]                               w = (q - 8) * d
Q4_1   32     qs uint8 [N, K/2];   d, m fp16 [N, K/32]                            w = q * d + m
Q4_K   256    qs uint8 [N, K/2];   d, dmin fp16 [N, K/256]; scales uint8 [N, K/256 * 12]
                                   (8 six-bit scales + 8 six-bit mins per 256)   w = d*sc * q - dmin*mn
Q6_K   256    ql uint8 [N, K/2];   qh uint8 [N, K/4]; scales int8 [N, K/16]; d fp16 [N, K/256]
                                   (q = 4 low bits | 2 high bits << 4)            w = d*sc * (q - 32)
=====  =====  ==========================================================================================

Nibble bytes keep ggml's order: in each run of G bytes (G = 16 for Q4_0/Q4_1, 32 for Q4_K, 64 for Q6_K's
ql), byte i holds value i in its low nibble and value i + G in its high one. A kernel therefore unpacks a
tile of bytes into two tiles, the low values and the high values, and multiplies each with the matching
columns of x: no shuffle of nibbles into place is ever needed. Q6_K's qh byte i of each run of 32 holds
the high bits of values i, i + 32, i + 64, i + 96 of a 128-value half block.

On CUDA `gguf_linear` runs the Triton GEMMs of `gguf_kernels`; elsewhere it dequantizes per call, so
memory holds only the quantized bytes on every device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from tessera.graphs import opaque_op


@dataclass(frozen=True)
class GGUFFormat:
    name: str
    block: int  # values per block
    block_bytes: int  # bytes per block in the file
    group: int  # G: nibble byte i of a run of G holds values i and i + G (Q8_0: none, 0)
    code: int  # the kernels' TYPE constant
    parts: tuple[str, ...]


FORMATS = {
    f.name: f
    for f in (
        GGUFFormat("Q8_0", 32, 34, 0, 0, ("qs", "d")),
        GGUFFormat("Q4_0", 32, 18, 16, 1, ("qs", "d")),
        GGUFFormat("Q4_1", 32, 20, 16, 2, ("qs", "d", "m")),
        GGUFFormat("Q4_K", 256, 144, 32, 3, ("qs", "d", "dmin", "scales")),
        GGUFFormat("Q6_K", 256, 210, 64, 4, ("ql", "qh", "scales", "d")),
    )
}


@dataclass(frozen=True, eq=False)
class GGUFWeight:
    """A weight [N, K] (`shape`) in `ggml_type`, as the parts of the module docstring's table."""

    ggml_type: str
    shape: tuple[int, int]
    parts: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        fmt = FORMATS.get(self.ggml_type)
        if fmt is None:
            raise ValueError(f"GGUF type {self.ggml_type!r} has no kernels (supported: {sorted(FORMATS)})")
        n, k = self.shape
        if k % fmt.block or len(self.parts) != len(fmt.parts):
            raise ValueError(f"{self.ggml_type}: K={k} must be a multiple of {fmt.block}, parts {fmt.parts}")
        if any(p.shape[0] != n or not p.is_contiguous() for p in self.parts):
            raise ValueError(f"{self.ggml_type}: every part must be contiguous with {n} rows")

    @property
    def format(self) -> GGUFFormat:
        return FORMATS[self.ggml_type]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def part(self, name: str) -> torch.Tensor:
        return self.parts[self.format.parts.index(name)]

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.ggml_type, self.shape, tuple(p.to(device) for p in self.parts))


def _f16(fields: torch.Tensor) -> torch.Tensor:
    """[N, blocks, 2] uint8 -> [N, blocks] float16 (the file is little-endian, as every host we run on)."""
    return fields.contiguous().view(torch.float16).squeeze(-1)


def _bytes(fields: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """[N, blocks, b] uint8 -> [N, blocks * b] of `dtype` (one byte each), block after block."""
    return fields.contiguous().view(dtype).reshape(fields.shape[0], -1)


def repack(raw: torch.Tensor, ggml_type: str, shape: tuple[int, int]) -> GGUFWeight:
    """The file's blocks, raw uint8 [N, bytes per row], as a `GGUFWeight` of the same bytes (at load)."""
    fmt = FORMATS.get(ggml_type)
    if fmt is None:
        raise ValueError(f"GGUF type {ggml_type!r} has no kernels (supported: {sorted(FORMATS)})")
    n, k = shape
    b = raw.reshape(n, k // fmt.block, fmt.block_bytes)  # [N, blocks, block bytes]
    if ggml_type == "Q8_0":
        parts = (_bytes(b[..., 2:], torch.int8), _f16(b[..., :2]))
    elif ggml_type == "Q4_0":
        parts = (_bytes(b[..., 2:]), _f16(b[..., :2]))
    elif ggml_type == "Q4_1":
        parts = (_bytes(b[..., 4:]), _f16(b[..., :2]), _f16(b[..., 2:4]))
    elif ggml_type == "Q4_K":
        parts = (_bytes(b[..., 16:]), _f16(b[..., :2]), _f16(b[..., 2:4]), _bytes(b[..., 4:16]))
    else:  # Q6_K
        parts = (_bytes(b[..., :128]), _bytes(b[..., 128:192]), _bytes(b[..., 192:208], torch.int8),
                 _f16(b[..., 208:]))  # fmt: skip
    return GGUFWeight(ggml_type, (n, k), parts)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 [N, K/2] -> values uint8 [N, K]: byte i of each run of `group` gives values i and i + group."""
    n, b = qs.shape  # NOTE: no -1 in the views here: a lookup of no rows (n = 0) must work too
    runs = qs.view(n, b // group, 1, group)
    # NOTE: shifts broadcast, not a cat of the two halves: Inductor mis-strides that cat where n is unbacked
    # (a lookup of embedding rows inside a compiled piece)
    shifts = torch.arange(0, 8, 4, dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return ((runs >> shifts) & 15).reshape(n, 2 * b)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes per block -> (scales, mins) uint8 [N, blocks, 8]: sub-blocks 0-3 keep 6 bits of
    bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take 4 bits of bytes 8-11 and the spare top 2."""
    a, b, c = scales.view(scales.shape[0], scales.shape[1] // 12, 3, 4).unbind(2)
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc, mn


def _q6_k_values(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """Q6_K's 6-bit values minus 32, int16 [N, K]."""
    # NOTE: arange, not torch.tensor([0, 2, 4, 6]): a lookup of embedding rows runs this inside captured
    # graphs, where a host-to-device copy is not allowed
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=qh.device).view(1, 1, 4, 1)
    n, b = qh.shape
    high = ((qh.view(n, b // 32, 1, 32) >> shifts) & 3).reshape(n, 4 * b)
    return (_nibbles(ql, 64) | (high << 4)).to(torch.int16) - 32


def dequantize(w: GGUFWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in `dtype`; in float32 bit-identical to `gguf.quants.dequantize` of the file's bytes (same
    float32 operations in the same order)."""
    n, k = w.shape
    blocks = k // w.format.block  # (not -1 in the views: a weight of no rows is valid)
    p = w.parts
    if w.ggml_type == "Q8_0":
        out = p[0].float().view(n, blocks, 32) * p[1].float()[..., None]
    elif w.ggml_type in ("Q4_0", "Q4_1"):
        q = _nibbles(p[0], 16).view(n, blocks, 32)
        if w.ggml_type == "Q4_0":
            out = p[1].float()[..., None] * (q.to(torch.int16) - 8).float()
        else:
            out = p[1].float()[..., None] * q.float() + p[2].float()[..., None]
    elif w.ggml_type == "Q4_K":
        sc, mn = _k_scales(p[3])
        scale = (p[1].float()[..., None] * sc.float())[..., None]  # [N, blocks, 8, 1]
        shift = (p[2].float()[..., None] * mn.float())[..., None]
        out = scale * _nibbles(p[0], 32).view(n, blocks, 8, 32).float() - shift
    else:  # Q6_K
        scale = (p[3].float()[..., None] * p[2].float().view(n, blocks, 16))[..., None]  # [N, blocks, 16, 1]
        out = scale * _q6_k_values(p[0], p[1]).view(n, blocks, 16, 16).float()
    return out.reshape(n, k).to(dtype)


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from tessera.quant import gguf_kernels
    except ImportError:  # no Triton: the reference everywhere
        return None
    return gguf_kernels


def _linear_fake(x: torch.Tensor, parts: list[torch.Tensor], ggml_type: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], parts[0].shape[0]))


@opaque_op("tessera::gguf_linear", fake=_linear_fake)
def _gguf_linear(x: torch.Tensor, parts: list[torch.Tensor], ggml_type: str) -> torch.Tensor:
    w = GGUFWeight(ggml_type, (parts[0].shape[0], x.shape[1]), tuple(parts))
    kernels = _kernels()
    if x.is_cuda and kernels is not None:
        return kernels.gguf_matmul(x, w)
    # NOTE: dequantized per call and dropped: memory holds only the quantized bytes, here as on a GPU
    return x @ dequantize(w, x.dtype).T


def gguf_linear(x: torch.Tensor, w: GGUFWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype, W kept quantized (`tessera::gguf_linear`)."""
    n, k = w.shape
    y = torch.ops.tessera.gguf_linear(x.reshape(-1, k), list(w.parts), w.ggml_type)
    y = y.view(*x.shape[:-1], n)
    return y if bias is None else y + bias
