"""Triton GEMMs for decode: a few token rows (M <= MAX_ROWS) against FP8 or MXFP4 weights, float32 sums.
FP8 is W8A8 as at every other M (the activations arrive quantized by `fp8.quantize_act`, so a row's
result does not depend on the path its batch size picks); MXFP4 is weight-only (W4A16).

A decode step reads every weight once and does almost no arithmetic per byte, so these kernels are
built to stream W at the memory's bandwidth:

* grid (cdiv(N, BLOCK_N), SPLIT_K): each program walks one [BLOCK_N, K / SPLIT_K] slab of the row-major
  weight in [BLOCK_N, BLOCK_K] tiles, contiguous along K (wide, coalesced loads, pipelined `num_stages`
  deep), decodes each tile to the MMA's dtype in registers and feeds it to `tl.dot` against the
  rows of x padded to ROWS = 16 (the smallest M tile of an MMA: every M <= 16 costs the same, and the
  tensor cores make the multiply free next to the decode);
* split K only where N alone gives too few programs to keep the SMs streaming: each split writes its
  float32 partial sums to [SPLIT_K, M, N] and a second kernel adds them in split order (no atomics, so
  a CUDA-graph replay gives the bits an eager call gives);
* rows stay independent: an MMA's output row is its input row's dot products only, and padded rows load
  as zeros, so a NaN or 1e30 in one row of x never reaches another row's output.

The configuration depends only on the shape (never on values), and launching allocates with
`torch.empty` only, so both entry points are CUDA-graph capturable.

MXFP4 decode: an e2m1 code (sign s, exponent e, mantissa m) is put into float16 bits as s << 15 | em <<
9: exponent field e, top mantissa bit m. That float16 is 2^-14 times the e2m1 value exactly, e = 0
included (float16's subnormals 0 and 2^-15 are e2m1's 0 and 0.5 over 2^14), so the decode is two shifts
and two masks per nibble, no select; the 2^14 goes into each group's scale. (Multiplied into the sums
at the end instead, it would leave W / 2^14 in the MMA's input dtype: subnormal in float16 for weights
below 1, inexact for blocks of scale under 2^-9; the tests' float16 case catches that.)

NOTE: a kernel may read a global only if it is a `tl.constexpr` (the interpreter accepts any, a GPU
compile does not: tests/test_triton_globals.py checks this module).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tessera.graphs import is_hip
from tessera.layers.kernel_launch import cdiv, next_pow2
from tessera.quant import gemv_tuned

log = logging.getLogger(__name__)

MAX_ROWS = 16  # the decode path's row limit: one MMA row tile
ROWS = tl.constexpr(MAX_ROWS)
# NOTE: equal to fp8.BLOCK and mxfp4.BLOCK_SIZE; not imported from those, which import this module
FP8_BLOCK = tl.constexpr(128)
MX_GROUP = tl.constexpr(32)
PER_TENSOR, PER_CHANNEL, BLOCKWISE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_SCHEME_IDS = {"per_tensor": PER_TENSOR.value, "per_channel": PER_CHANNEL.value, "block": BLOCKWISE.value}
MX_UNSCALE = tl.constexpr(16384.0)  # 2^14: the float16 decode's values are 2^-14 of e2m1's
# NOTE: Triton's interpreter (3.9) multiplies bfloat16 tiles as their raw uint16 bits; there both
# operands go to float32 first, which is exact and what the GPU's MMA accumulates anyway
_DOT_IN_F32 = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true")


@dataclass(frozen=True)
class GemvConfig:
    """Tiles and launch options of one decode GEMM. `block_n`, `block_k`: powers of two >= 16 (`tl.dot`'s
    smallest tile); FP8 "block" needs block_k <= 128 (one weight scale per K step), MXFP4 block_k >= 32
    (whole scale groups). `split_k`: programs along K (fewer run where K has fewer tiles)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


# The shape rule for cards and shapes without a tuned entry (`gemv_tuned`). H100 / H200 have 132 SMs.
# Two programs an SM (~256) with a few tiles in flight each cover the memory latency; fewer programs
# leave SMs idle, so K is split until N's tiles and the splits make about that many, keeping >= 4 K
# steps per split so each program's pipeline fills. Wide N tiles (64) halve the re-reads of x (from L2)
# per weight byte; narrow ones (32) give small N twice the programs.
_MIN_PROGRAMS = 256
_MIN_STEPS = 4
_MAX_SPLIT = 16


def _block_n(n: int) -> int:
    return 64 if cdiv(n, 64) >= _MIN_PROGRAMS else 32


def _stages(cuda: int) -> int:
    # NOTE: MI300's LDS is 64 KiB and its pipeliner counts stages differently: two stages fit every tile
    return 2 if is_hip() else cuda


def _split_k(n_tiles: int, k_steps: int) -> int:
    split = 1
    while n_tiles * split < _MIN_PROGRAMS and k_steps >= 2 * split * _MIN_STEPS and split < _MAX_SPLIT:
        split *= 2
    return split


def fp8_config(scheme: str, n: int, k: int) -> GemvConfig:
    """The default config for FP8 weights [n, k]. Every M <= MAX_ROWS runs the same 16-row tile, so M
    does not enter. K steps of 256 bytes a row (a 32x256 tile is 8 KiB, 4 stages in flight); "block"
    steps 128 (its scale group) with 6 stages for about as many bytes in flight."""
    block_n = _block_n(n)
    block_k, stages = (128, 6) if scheme == "block" else (256, 4)
    split = _split_k(cdiv(n, block_n), cdiv(k, block_k))
    return GemvConfig(block_n, block_k, split, num_warps=4, num_stages=_stages(stages))


def mxfp4_config(n: int, k: int) -> GemvConfig:
    """The default config for MXFP4 weights [n, k]: K steps of 256 values (128 bytes a row plus 8 scale
    bytes); the decoded tile [64, 256] is 128 values a thread in 4 warps, about what fits in registers."""
    block_n = _block_n(n)
    split = _split_k(cdiv(n, block_n), cdiv(k, 256))
    return GemvConfig(block_n, 256, split, num_warps=4, num_stages=_stages(4))


def _config(device: torch.device, fmt: str, n: int, k: int) -> GemvConfig | None:
    fields = gemv_tuned.lookup(device, fmt, n, k)
    return GemvConfig(**fields) if fields is not None else None


def _check_config(cfg: GemvConfig, min_k: int, max_k: int) -> None:
    for name in ("block_n", "block_k"):
        size = getattr(cfg, name)
        if size < 16 or size != next_pow2(size):
            raise ValueError(f"{name} = {size}: a power of two >= 16")
    if not min_k <= cfg.block_k <= max_k:
        raise ValueError(f"block_k = {cfg.block_k}: this format takes {min_k} to {max_k}")
    if cfg.split_k < 1:
        raise ValueError(f"split_k = {cfg.split_k}: at least 1")


def _k_split(k: int, cfg: GemvConfig) -> tuple[int, int]:
    """(K range of a split, a multiple of block_k; number of splits, none of them empty)."""
    per_split = cdiv(cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    return per_split, cdiv(k, per_split)


@triton.jit
def _store(acc, Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """acc [ROWS, BLOCK_N] to Out: float32 partials at split program_id(1) of [SPLIT_K, M, N], or the
    output rows (plus bias, in Out's dtype)."""
    offs_m = tl.arange(0, ROWS)
    ok = (offs_m < M)[:, None] & n_ok[None, :]
    if PARTIAL:
        base = Out + tl.program_id(1).to(tl.int64) * M * N
        tl.store(base + offs_m[:, None] * N + offs_n[None, :], acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = Out + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def _dot(x, w, DOT_IN_F32: tl.constexpr):
    """x [ROWS, BLOCK_K] @ w [BLOCK_N, BLOCK_K].T in float32, both in the activations' dtype (the
    interpreter's float32 copies of them: the same values)."""
    if DOT_IN_F32:
        x, w = x.to(tl.float32), w.to(tl.float32)
    return tl.dot(x, tl.trans(w))


@triton.jit
def _slab(M, N, K, K_SPLIT, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's row, column and K-lane offsets, the rows' and columns' masks, and its K range."""
    offs_m = tl.arange(0, ROWS)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    return offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < M, offs_n < N, k_lo, k_hi


@triton.jit(do_not_specialize=["M"])
def _fp8_gemv_kernel(
    X, XS, W, S, Bias, Out, M, N, K, K_SPLIT, stride_xm, stride_xsm, stride_wn, stride_sn, stride_om,
    SCHEME: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_IN_F32: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = sum_k X[m, k] * xscale(m, k) * W[n, k] * scale(n, k) (+ Bias[n]) over this program's
    K split, X and W fp8. Both go to bfloat16 exactly (e4m3's 3 mantissa bits fit) for an MMA whose
    products are exact in its float32 sums; block scales (1x128 of X, 128x128 of W) multiply each K
    step's product (BLOCK_K divides 128: one scale a row per step), per-token / per-channel ones the sums
    once."""
    offs_m, offs_n, offs_k, m_ok, n_ok, k_lo, k_hi = _slab(M, N, K, K_SPLIT, BLOCK_N, BLOCK_K)
    x_ptrs = X + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # NOTE: with K and K_SPLIT divisible by 16 (Triton specializes on it) the K mask is constant
        # over 16 elements, so these still load 16 bytes at a time
        k_ok = (offs_k < k_hi - k0)[None, :]
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0.0)
        part = _dot(x.to(tl.bfloat16), w.to(tl.bfloat16), DOT_IN_F32)
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
    _store(acc, Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS, PARTIAL)


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


@triton.jit(do_not_specialize=["M"])
def _mxfp4_gemv_kernel(
    X, Wb, Ws, Bias, Out, M, N, K, K_SPLIT, stride_xm, stride_bn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = sum_k X[m, k] * W[n, k] (+ Bias[n]) over this program's K split, W in MXFP4 (K is a
    multiple of 32, so a masked K step masks whole scale groups)."""
    offs_m, offs_n, offs_k, m_ok, n_ok, k_lo, k_hi = _slab(M, N, K, K_SPLIT, BLOCK_N, BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_ok[:, None] & (offs_k < k_hi - k0)[None, :], other=0.0)  # fmt: skip
        w = _mxfp4_tile(Wb, Ws, offs_n, n_ok, k0, k_hi, stride_bn, stride_sn, BLOCK_N, BLOCK_K // MX_GROUP)
        acc += _dot(x, w.to(X.dtype.element_ty), DOT_IN_F32)
    _store(acc, Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS, PARTIAL)


@triton.jit(do_not_specialize=["M"])
def _split_sum_kernel(P, Bias, Out, M, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    """Out (contiguous [M, N]) = the sum of the partials P [SPLIT_K, M, N] in split order (+ Bias)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.load(P + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(P + s * M * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=ok)


def _launch(
    kernel: triton.JITFunction,
    x: torch.Tensor,
    operands: tuple[torch.Tensor, ...],
    n: int,
    k: int,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    out_dtype: torch.dtype,
    **constexprs: int,
) -> torch.Tensor:
    """Run `kernel` over (N tiles, K splits) and, where K is split, the partials' sum. `operands`: the
    kernel's tensors after x (scales, weights), whose row strides it takes after x's in the same order."""
    m = x.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    per_split, splits = _k_split(k, cfg)
    partial = splits > 1
    dest = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if partial else out
    kernel[(cdiv(n, cfg.block_n), splits)](
        x, *operands, bias if bias is not None else x, dest, m, n, k, per_split, x.stride(0),
        *(t.stride(0) if t.dim() == 2 else 0 for t in operands), out.stride(0),
        HAS_BIAS=bias is not None, PARTIAL=partial, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_IN_F32=_DOT_IN_F32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **constexprs,
    )  # fmt: skip
    if partial:
        block = 1024
        _split_sum_kernel[(cdiv(m * n, block),)](
            dest, bias if bias is not None else x, out, m, n, SPLIT_K=splits, HAS_BIAS=bias is not None,
            BLOCK=block,
        )  # fmt: skip
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        raise ValueError(f"decode GEMMs take x [M <= {MAX_ROWS}, K], got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


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
    xq = _rows(xq)
    n, k = qweight.shape
    fmt = "fp8_block" if scheme == "block" else "fp8"
    cfg = config or _config(xq.device, fmt, n, k) or fp8_config(scheme, n, k)
    _check_config(cfg, 16, 128 if scheme == "block" else 1 << 30)
    # per-tensor / per-channel scales are read by position alone: a 1-D view makes their stride 0
    scale = scale.float().contiguous() if scheme == "block" else scale.float().reshape(-1)
    operands = (x_scale.contiguous(), qweight.contiguous(), scale)
    return _launch(_fp8_gemv_kernel, xq, operands, n, k, bias, cfg, out_dtype, SCHEME=_SCHEME_IDS[scheme])


def mxfp4_gemv(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, bf16 / fp16 / fp32) @ W.T (+ bias) -> [M, N] in x's dtype, float32 sums;
    W [N, K] in MXFP4 as blocks uint8 [N, K/2], scales uint8 [N, K/32]. `config` defaults to the card's
    tuned one, else `mxfp4_config`."""
    x = _rows(x)
    n, k = blocks.shape[0], blocks.shape[1] * 2
    cfg = config or _config(x.device, "mxfp4", n, k) or mxfp4_config(n, k)
    _check_config(cfg, 32, 1 << 30)
    operands = (blocks.contiguous(), scales.contiguous())
    return _launch(_mxfp4_gemv_kernel, x, operands, n, k, bias, cfg, x.dtype)


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
        got = (fp8_gemv(*args, "per_channel", torch.float32) if fmt == "fp8" else mxfp4_gemv(*args)).cpu()
    except Exception as e:  # a kernel this device cannot compile or run
        log.warning("the %s decode GEMM is unavailable on %s (%s); the other GEMMs run", fmt, device, e)
        return False
    if not ((got - want).norm() / want.norm()).item() < 5e-3:  # TF32 at most (float32 x of MXFP4)
        log.warning("the %s decode GEMM gives wrong results on %s; the other GEMMs run", fmt, device)
        return False
    return True
