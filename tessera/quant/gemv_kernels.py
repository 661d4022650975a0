"""Decode GEMMs (M <= MAX_ROWS rows) against FP8 or MXFP4 weights, on the weight-streaming machinery of
`tessera.layers.gemv` (its docstring has the design: tiles, split K, row independence, tuned configs).
FP8 is W8A8 as at every other M (the activations arrive quantized by `fp8.quantize_act`, so a row's
result does not depend on the path its batch size picks); MXFP4 is weight-only (W4A16). Both decode
each weight tile to the MMA's dtype in registers, inside the K loop, or (`GemvConfig.native_mma`, where
the card's table says it is faster) hand the tiles over as they are: FP8's to an fp8 MMA, MXFP4's codes
and scales to `tl.dot_scaled`, whose upcast Triton lowers per target (and to the MXFP4 MMA of cards
that have one, MI355X's included).

MXFP4 at one row of x (`GemvConfig.fma`, the untuned default there) takes no MMA at all: a weight decoded
for an MMA (here, or in `tl.dot_scaled`'s upcast on cards without an MXFP4 MMA) goes through shared
memory into the operand layout, about 4 bytes of shared-memory traffic per 0.5-byte weight (what bounds
those kernels' bandwidth: docs/gpu.md, fourteenth session), while one row's dot products are CUDA-core
FMAs on the weights in the registers they were loaded and decoded in.

MXFP4 decode: an e2m1 code (sign s, exponent e, mantissa m) is put into float16 bits as s << 15 | em <<
9: exponent field e, top mantissa bit m. That float16 is 2^-14 times the e2m1 value exactly, e = 0
included (float16's subnormals 0 and 2^-15 are e2m1's 0 and 0.5 over 2^14), so the decode is two shifts
and two masks per nibble (per two in the one-row kernel, one in each half of an int32), no select; the
2^14 goes into each group's scale. (Multiplied into the sums
at the end instead, it would leave W / 2^14 in the MMA's input dtype: subnormal in float16 for weights
below 1, inexact for blocks of scale under 2^-9; the tests' float16 case catches that.)

NOTE: a kernel may read a global only if it is a `tl.constexpr` (the interpreter accepts any, a GPU
compile does not: tests/test_triton_globals.py checks this module).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import triton
import triton.language as tl

from tessera.graphs import is_hip
from tessera.layers.gemv import (
    MAX_ROWS,
    ROWS,
    GemvConfig,
    check_config,
    config_for,
    dot,
    launch,
    load_step,
    pointers,
    rows,
    shape_rule,
    slab,
    store,
)

log = logging.getLogger(__name__)

# NOTE: equal to fp8.BLOCK and mxfp4.BLOCK_SIZE; not imported from those, which import this module
FP8_BLOCK = tl.constexpr(128)
MX_GROUP = tl.constexpr(32)
PER_TENSOR, PER_CHANNEL, BLOCKWISE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_SCHEME_IDS = {"per_tensor": PER_TENSOR.value, "per_channel": PER_CHANNEL.value, "block": BLOCKWISE.value}
MX_UNSCALE = tl.constexpr(16384.0)  # 2^14: the float16 decode's values are 2^-14 of e2m1's
# the float32 decode (`_f32_bits`): its sign and exponent-mantissa bits; x times 2^63 (each group's sum
# times 2^63 again), so products of its 2^-126-scaled values stay normal
MX_SIGN32, MX_EM32, MX_X_UP = tl.constexpr(-0x80000000), tl.constexpr(0x01C00000), tl.constexpr(2.0**63)
# the float16 sign bits and exponent-mantissa bits of both halves of an int32 (0x80008000 as int32)
MX_SIGNS2, MX_EM2 = tl.constexpr(-0x7FFF8000), tl.constexpr(0x0E000E00)
# `tl.dot_scaled`'s names of the activations' dtypes
_DOT_SCALED_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# (MAX_ROWS and GemvConfig are part of this module's interface: its callers read them here)
__all__ = [
    "MAX_ROWS",
    "GemvConfig",
    "fp8_config",
    "fp8_gemv",
    "fp8_tuned",
    "mxfp4_config",
    "mxfp4_gemv",
    "usable",
]


def fp8_config(scheme: str, n: int, k: int) -> GemvConfig:
    """The default config for FP8 weights [n, k]. Every M <= MAX_ROWS runs the same 16-row tile, so M
    does not enter. K steps of 256 bytes a row (a 32x256 tile is 8 KiB, 4 stages in flight); "block"
    steps 128 (its scale group) with 6 stages for about as many bytes in flight."""
    return shape_rule(n, k, 128, 6) if scheme == "block" else shape_rule(n, k, 256, 4)


def fp8_tuned(device: torch.device, scheme: str, n: int, k: int) -> bool:
    """Whether this card's table has an FP8 decode config for [n, k] in `scheme`: FP8 decode takes this
    kernel only there (the sweep saves one only where it beat `torch._scaled_mm` / the block GEMM)."""
    return config_for(device, "fp8_block" if scheme == "block" else "fp8", n, k) is not None


def mxfp4_config(n: int, k: int) -> GemvConfig:
    """The default config for MXFP4 weights [n, k]: K steps of 256 values (128 bytes a row plus 8 scale
    bytes); the decoded tile [64, 256] is 128 values a thread in 4 warps, about what fits in registers.
    `fma`: one row takes the FMA kernel with these tiles (a [64, 256] step is 64 bytes a thread)."""
    return dataclasses.replace(shape_rule(n, k, 256, 4), fma=True)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemv_kernel(
    X, XS, W, S, Bias, Out, M, N, K, K_SPLIT, stride_xm, stride_xsm, stride_wn, stride_sn, stride_om,
    SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_IN_F32: tl.constexpr, NATIVE_MMA: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = sum_k X[m, k] * xscale(m, k) * W[n, k] * scale(n, k) (+ Bias[n]) over this program's
    K split, X and W fp8. Both go to bfloat16 exactly (e4m3's 3 mantissa bits fit) for an MMA whose
    products are exact in its float32 sums, or with NATIVE_MMA to an fp8 MMA as they are (no conversion in
    registers; Hopper adds within a K step at less than float32's precision); block scales (1x128 of X,
    128x128 of W) multiply each K step's product (BLOCK_K divides 128: one scale a row per step),
    per-token / per-channel ones the sums once."""
    offs_m, offs_n, offs_k, m_ok, n_ok, k_lo, k_hi = slab(M, N, K, K_SPLIT, BLOCK_N, BLOCK_K)
    x_ptrs, w_ptrs = pointers(X, W, offs_m, offs_n, offs_k, k_lo, stride_xm, stride_wn)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, w = load_step(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, k_hi - k0)
        if not NATIVE_MMA:
            x, w = x.to(tl.bfloat16), w.to(tl.bfloat16)
        part = dot(x, w, DOT_IN_F32)
        if SCHEME == BLOCKWISE:
            xs = tl.load(XS + offs_m * stride_xsm + k0 // FP8_BLOCK, mask=m_ok, other=0.0)
            s = tl.load(S + (offs_n // FP8_BLOCK) * stride_sn + k0 // FP8_BLOCK, mask=n_ok, other=0.0)
            acc += part * (xs[:, None] * s[None, :])
        else:
            acc += part
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCHEME != BLOCKWISE:
        acc *= tl.load(XS + offs_m * stride_xsm, mask=m_ok, other=0.0)[:, None]
    if SCHEME == PER_CHANNEL:
        acc *= tl.load(S + offs_n, mask=n_ok, other=0.0)[None, :]
    elif SCHEME == PER_TENSOR:
        acc *= tl.load(S)
    store(acc, Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS, PARTIAL)


@triton.jit
def _mxfp4_tile(Wb, Ws, offs_n, n_ok, k0, k_hi, stride_bn, stride_sn,
                BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):  # fmt: skip
    """W[offs_n, k0 : k0 + 32 * GROUPS] as float32 [BLOCK_N, 32 * GROUPS], zero past k_hi."""
    kg = k0 // MX_GROUP + tl.arange(0, GROUPS)
    ok = n_ok[:, None] & (kg[None, :] * MX_GROUP < k_hi)  # [BLOCK_N, GROUPS]
    rows = offs_n[:, None].to(tl.int64)
    byte = kg[None, :, None] * (MX_GROUP // 2) + tl.arange(0, MX_GROUP // 2)[None, None, :]
    packed = tl.load(Wb + rows[:, :, None] * stride_bn + byte, mask=ok[:, :, None], other=0).to(tl.int32)
    # float16 bits of each nibble: sign (bit 3) to bit 15, exponent and mantissa (bits 0-2) to bits 9-11
    lo = ((packed << 12) & 0x8000) | ((packed << 9) & 0x0E00)
    hi = ((packed << 8) & 0x8000) | ((packed << 5) & 0x0E00)
    # low nibble = even element: join puts it first along the new minor axis
    bits = tl.reshape(tl.join(lo, hi), [BLOCK_N, GROUPS, MX_GROUP])
    values = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    s = tl.load(Ws + rows * stride_sn + kg[None, :], mask=ok, other=0).to(tl.int32)
    # 2^(s - 127) from its bits, times the decode's 2^14 (exact). s = 0 (2^-127) gives 0: only ever an
    # all-zero block's scale; s > 240 (2^114 and up, NaN) overflows to inf, far above any real weight's
    scale = (s << 23).to(tl.float32, bitcast=True) * MX_UNSCALE
    return tl.reshape(values * scale[:, :, None], [BLOCK_N, GROUPS * MX_GROUP])


@triton.jit
def _mxfp4_codes(Wb, Ws, offs_n, n_ok, k0, k_hi, stride_bn, stride_sn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """W[offs_n, k0 : k0 + BLOCK_K] as `tl.dot_scaled` takes a right operand: the codes [BLOCK_K / 2,
    BLOCK_N] (K packed two to a byte, low nibble first, as stored) and the scales [BLOCK_N, BLOCK_K /
    32]; zero codes past k_hi (whatever their scale, they are 0)."""
    rows = offs_n.to(tl.int64)
    kb = tl.arange(0, BLOCK_K // 2)
    kg = k0 // MX_GROUP + tl.arange(0, BLOCK_K // MX_GROUP)
    codes = tl.load(Wb + rows[None, :] * stride_bn + (k0 // 2 + kb)[:, None],
                    mask=n_ok[None, :] & (2 * kb < k_hi - k0)[:, None], other=0)  # fmt: skip
    scales = tl.load(Ws + rows[:, None] * stride_sn + kg[None, :],
                     mask=n_ok[:, None] & (kg * MX_GROUP < k_hi)[None, :], other=0)  # fmt: skip
    return codes, scales


@triton.jit(do_not_specialize=["M"])
def _mxfp4_gemv_kernel(
    X, Wb, Ws, Bias, Out, M, N, K, K_SPLIT, stride_xm, stride_bn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr, NATIVE_MMA: tl.constexpr, X_FORMAT: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = sum_k X[m, k] * W[n, k] (+ Bias[n]) over this program's K split, W in MXFP4 (K is a
    multiple of 32, so a masked K step masks whole scale groups): decoded here (`_mxfp4_tile`) or, with
    NATIVE_MMA, by `tl.dot_scaled` (X in bf16 / fp16, its `X_FORMAT`)."""
    offs_m, offs_n, offs_k, m_ok, n_ok, k_lo, k_hi = slab(M, N, K, K_SPLIT, BLOCK_N, BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_ok[:, None] & (offs_k < k_hi - k0)[None, :], other=0.0)  # fmt: skip
        if NATIVE_MMA:
            codes, scales = _mxfp4_codes(Wb, Ws, offs_n, n_ok, k0, k_hi, stride_bn, stride_sn,
                                         BLOCK_N, BLOCK_K)  # fmt: skip
            acc = tl.dot_scaled(x, None, X_FORMAT, codes, scales, "e2m1", acc)
        else:
            w = _mxfp4_tile(Wb, Ws, offs_n, n_ok, k0, k_hi, stride_bn, stride_sn,
                            BLOCK_N, BLOCK_K // MX_GROUP)  # fmt: skip
            acc += dot(x, w.to(X.dtype.element_ty), DOT_IN_F32)
    store(acc, Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS, PARTIAL)


@triton.jit
def _nibble_halves(words, NIBBLE: tl.constexpr):
    """Float16 bits of nibble NIBBLE (0 .. 3) of each 16-bit half of int32 `words`, in that half. A half
    holds two bytes, four e2m1 codes (low nibble first), this one at bits 4 NIBBLE .. 4 NIBBLE + 3: its
    sign goes to bit 15, its exponent and mantissa to bits 9 .. 11 (the float16 of `_mxfp4_tile`: 2^-14
    of the e2m1 value). A shift carries bits across the halves only into bits the masks clear."""
    if NIBBLE == 3:
        return (words & MX_SIGNS2) | ((words >> 3) & MX_EM2)
    return ((words << (12 - 4 * NIBBLE)) & MX_SIGNS2) | ((words << (9 - 4 * NIBBLE)) & MX_EM2)


@triton.jit
def _f32_bits(words, NIBBLE: tl.constexpr):
    """float32 of nibble NIBBLE (0 .. 7) of each int32 word: its sign to bit 31, its exponent and mantissa
    to bits 22 .. 24, which is 2^-126 of the e2m1 value exactly (e = 0, 0.5, a float32 subnormal: FMAs
    take those at full rate, and the products, with x scaled by 2^63, are normal)."""
    sign = (words << (28 - 4 * NIBBLE)) & MX_SIGN32
    if NIBBLE <= 5:
        return (sign | ((words << (22 - 4 * NIBBLE)) & MX_EM32)).to(tl.float32, bitcast=True)
    return (sign | ((words >> (4 * NIBBLE - 22)) & MX_EM32)).to(tl.float32, bitcast=True)


@triton.jit
def _f16_half(bits, HIGH: tl.constexpr):
    """float32 of the float16 in the low (or HIGH) 16 bits of int32 `bits`."""
    if HIGH:
        bits = bits >> 16
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _mxfp4_row_kernel(
    X, Wq, Ws, Bias, Out, M, N, K, K_SPLIT, stride_xm, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr, F32_DECODE: tl.constexpr,
):  # fmt: skip
    """Out[0, n] = sum_k X[0, k] * W[n, k] (+ Bias[n]) over this program's K split, for x of one row (M =
    1) and W in MXFP4 (K a multiple of 32), by CUDA-core FMAs in float32 on the weights where they were
    loaded: no MMA, so no layout conversion of W (DOT_IN_F32, which `launch` passes every kernel, is
    unused). `Wq`: the codes as int32 [N, K/8], four bytes (eight codes) a word, as stored. F32_DECODE:
    each code decoded into float32 bits on its own (`_f32_bits`) instead of the paired float16 decode
    below and its conversions (x times 2^63 overflows past 2^65 in magnitude, far beyond activations).

    A K step loads W as [BLOCK_N, groups, 4] words (a scale group of a row: 16 contiguous bytes, which
    Triton's layout gives one thread as one vectorized load) and decodes two codes per integer op: word w
    of a group holds its elements 8w .. 8w + 3 in its low half and 8w + 4 .. 8w + 7 in its high half, both
    turned into float16 bits at once (`_nibble_halves`; a float32 conversion reads either half as it is).
    A group's 32 products with x are summed in float32 FMAs (within the thread holding it) and the sum
    scaled once, by the group's 2^(s - 127) * 2^14 (a power of two: exact, but where float32 under- or
    overflows; an inf scale, s > 240, makes the sum inf or NaN where the tile decode's 0 * inf makes it
    NaN). A program keeps [BLOCK_N, groups] float32 sums, added along K once at the end."""
    _, offs_n, _, _, n_ok, k_lo, k_hi = slab(M, N, K, K_SPLIT, BLOCK_N, BLOCK_K)
    rows = offs_n[:, None].to(tl.int64)
    w4 = tl.arange(0, MX_GROUP // 8)  # a group's words
    acc = tl.zeros([BLOCK_N, BLOCK_K // MX_GROUP], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kg = k0 // MX_GROUP + tl.arange(0, BLOCK_K // MX_GROUP)
        g_ok = kg * MX_GROUP < k_hi
        ok = n_ok[:, None] & g_ok[None, :]  # [BLOCK_N, groups]
        word = kg[None, :, None] * (MX_GROUP // 8) + w4[None, None, :]
        words = tl.load(Wq + rows[:, :, None] * stride_qn + word, mask=ok[:, :, None], other=0)
        x_at = X + kg[:, None] * MX_GROUP + 8 * w4[None, :]  # [groups, words]: each word's element 0
        part = tl.zeros([BLOCK_N, BLOCK_K // MX_GROUP, MX_GROUP // 8], dtype=tl.float32)
        if F32_DECODE:
            for j in tl.static_range(8):
                x_j = tl.load(x_at + j, mask=g_ok[:, None], other=0.0).to(tl.float32) * MX_X_UP
                part += _f32_bits(words, j) * x_j[None, :, :]
        else:
            for i in tl.static_range(4):
                bits = _nibble_halves(words, i)
                x_lo = tl.load(x_at + i, mask=g_ok[:, None], other=0.0).to(tl.float32)
                x_hi = tl.load(x_at + 4 + i, mask=g_ok[:, None], other=0.0).to(tl.float32)
                part += _f16_half(bits, False) * x_lo[None, :, :]
                part += _f16_half(bits, True) * x_hi[None, :, :]
        s = tl.load(Ws + rows * stride_sn + kg[None, :], mask=ok, other=0).to(tl.int32)
        scale = (s << 23).to(tl.float32, bitcast=True)
        if F32_DECODE:  # the products are 2^-63 of x * w: back first, then the group's scale
            acc += (tl.sum(part, 2) * MX_X_UP) * scale
        else:
            acc += tl.sum(part, 2) * (scale * MX_UNSCALE)
    store(tl.sum(acc, 1)[None, :], Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS, PARTIAL, 1)


def fp8_gemv(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    scheme: str,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """(xq fp8 [M, K] * x_scale).T-scaled rows (M <= MAX_ROWS; x_scale float32 [M, 1] per token, or
    [M, ceil(K/128)] per 1x128 group for "block", as `fp8.quantize_act` gives) @ (qweight fp8 [N, K] *
    scale).T (+ bias) -> [M, N] in `out_dtype`, float32 sums; `scale` float32 as `tessera.quant.fp8`
    defines it for `scheme`. `config` defaults to the card's tuned one, else `fp8_config`."""
    xq = rows(xq)
    n, k = qweight.shape
    fmt = "fp8_block" if scheme == "block" else "fp8"
    cfg = config or config_for(xq.device, fmt, n, k) or fp8_config(scheme, n, k)
    check_config(cfg, 16, 128 if scheme == "block" else 1 << 30, quantized=True)
    # per-tensor / per-channel scales are read by position alone: a 1-D view makes their stride 0
    scale = scale.float().contiguous() if scheme == "block" else scale.float().reshape(-1)
    operands = (x_scale.contiguous(), qweight.contiguous(), scale)
    return launch(
        _fp8_gemv_kernel, xq, operands, n, k, bias, cfg, out_dtype, SCHEME=_SCHEME_IDS[scheme],
        NATIVE_MMA=cfg.native_mma,
    )  # fmt: skip


def mxfp4_gemv(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, bf16 / fp16 / fp32) @ W.T (+ bias) -> [M, N] in x's dtype, float32 sums;
    W [N, K] in MXFP4 as blocks uint8 [N, K/2], scales uint8 [N, K/32]. `config` defaults to the card's
    tuned one, "mxfp4_m1" for one row and "mxfp4" for more (decoding here where its `native_mma` cannot
    take float32 x), else `mxfp4_config`. One row with `config.fma` takes the FMA kernel, else the MMA
    one."""
    x = rows(x)
    n, k = blocks.shape[0], blocks.shape[1] * 2
    one_row = x.shape[0] == 1
    cfg = config or config_for(x.device, "mxfp4_m1" if one_row else "mxfp4", n, k) or mxfp4_config(n, k)
    check_config(cfg, 32, 1 << 30, quantized=True, has_fma=True)
    operands = (blocks.contiguous(), scales.contiguous())
    if cfg.fma and one_row:
        # int32 words of codes: a byte offset that is not a multiple of 4 takes a copy
        codes = operands[0] if operands[0].storage_offset() % 4 == 0 else operands[0].clone()
        return launch(
            _mxfp4_row_kernel, x, (codes.view(torch.int32), operands[1]), n, k, bias, cfg, x.dtype,
            F32_DECODE=cfg.f32_decode,
        )  # fmt: skip
    x_format = _DOT_SCALED_FORMATS.get(x.dtype)
    if cfg.native_mma and x_format is None:
        if config is not None:
            raise ValueError(f"native_mma: MXFP4 takes bf16 / fp16 activations there, not {x.dtype}")
        cfg = dataclasses.replace(cfg, native_mma=False)
    return launch(
        _mxfp4_gemv_kernel, x, operands, n, k, bias, cfg, x.dtype, NATIVE_MMA=cfg.native_mma,
        X_FORMAT=x_format or "bf16",
    )  # fmt: skip


_USABLE: dict[tuple[torch.device, str], bool] = {}
# e2m1 code -> value (as in `tessera.quant.mxfp4`, which imports this module)
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def usable(device: torch.device, fmt: str) -> bool:
    """Whether the decode GEMM of `fmt` ("fp8" or "mxfp4") compiles and agrees with torch on `device`,
    found once with a tiny GEMM (quantized layers ask right after loading). NOTE: the probe syncs, so a
    device first asked inside a graph capture answers False and the other GEMMs run."""
    if (device, fmt) not in _USABLE:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        _USABLE[device, fmt] = _probe(device, fmt)
    return _USABLE[device, fmt]


def _probe_case(fmt: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A tiny GEMM's CPU operands for `fmt`'s decode kernel, and its float32 result."""
    gen = torch.Generator().manual_seed(0)
    if fmt == "fp8":
        fp8_type = torch.float8_e4m3fnuz if is_hip() else torch.float8_e4m3fn
        xq, wq = (torch.randn(n, 256, generator=gen).to(fp8_type) for n in (3, 48))
        x_scale, w_scale = torch.rand(3, 1, generator=gen) + 0.5, torch.rand(48, generator=gen) + 0.5
        return (xq, x_scale, wq, w_scale), (xq.float() * x_scale) @ (wq.float() * w_scale[:, None]).T
    x = torch.randn(3, 256, generator=gen)
    blocks = torch.randint(0, 256, (48, 128), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 134, (48, 8), generator=gen, dtype=torch.uint8)
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).view(48, 256).long()  # low nibble first
    w = torch.tensor(_E2M1)[codes] * torch.exp2(scales.float() - 127).repeat_interleave(32, 1)
    return (x, blocks, scales), x @ w.T


def _probe(device: torch.device, fmt: str) -> bool:
    operands, want = _probe_case(fmt)
    args = [t.to(device) for t in operands]
    try:
        if fmt == "fp8":
            got = fp8_gemv(*args, "per_channel", torch.float32).cpu()
        else:  # several rows (the MMA kernel) and one (by default the FMA kernel)
            got = torch.cat([mxfp4_gemv(*args).cpu(), mxfp4_gemv(args[0][:1], *args[1:]).cpu()])
            want = torch.cat([want, want[:1]])
    except Exception as e:  # a kernel this device cannot compile or run
        log.warning("the %s decode GEMM is unavailable on %s (%s); the other GEMMs run", fmt, device, e)
        return False
    if not ((got - want).norm() / want.norm()).item() < 5e-3:  # TF32 at most (float32 x of MXFP4)
        log.warning("the %s decode GEMM gives wrong results on %s; the other GEMMs run", fmt, device)
        return False
    return True
