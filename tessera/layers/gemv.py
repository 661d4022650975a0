"""Triton GEMMs for decode: a few token rows (M <= MAX_ROWS) against a weight streamed from memory once,
float32 sums. Here the machinery and the dense (bf16 / fp16) weight's kernel and op;
`tessera.quant.gemv_kernels` adds FP8 and MXFP4 weights on the same machinery.

A decode step reads every weight once and does almost no arithmetic per byte, so these kernels are
built to stream W at the memory's bandwidth:

* grid (cdiv(N, BLOCK_N), SPLIT_K): each program walks one [BLOCK_N, K / SPLIT_K] slab of the row-major
  weight in [BLOCK_N, BLOCK_K] tiles, contiguous along K (wide, coalesced loads, pipelined `num_stages`
  deep), turns each tile into the MMA's dtype in registers and feeds it to `tl.dot` against the rows of
  x padded to ROWS = 16 (the smallest M tile of an MMA: every M <= 16 costs the same, and the tensor
  cores make the multiply free next to the loads); MXFP4 at one row (`GemvConfig.fma`) multiplies in
  registers instead (`tessera.quant.gemv_kernels`);
* split K only where N alone gives too few programs to keep the SMs streaming: each split writes its
  float32 partial sums to [SPLIT_K, M, N] and a second kernel adds them in split order (no atomics, so
  a CUDA-graph replay gives the bits an eager call gives);
* rows stay independent: an MMA's output row is its input row's dot products only, and padded rows load
  as zeros, so a NaN or 1e30 in one row of x never reaches another row's output.

The configuration depends only on the shape (never on values): a card's tuned table (`gemv_tuned`, from
`python -m benchmarks.decode_gemm --sweep --save-configs`) where it has the shape, else a shape rule.
Launching allocates with `torch.empty` only, so every entry point is CUDA-graph capturable.

Dense weights take this path only where the card's table has their shape: cuBLAS streams large weights
at the copy bandwidth already, and the sweep saves a dense config only where it beat cuBLAS at every
swept M. So an untuned card runs exactly what it ran before.

NOTE: a kernel may read a global only if it is a `tl.constexpr` (the interpreter accepts any, a GPU
compile does not: tests/test_triton_globals.py checks this module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessera.graphs import is_hip, opaque_op
from tessera.layers import gemv_tuned
from tessera.layers.kernel_launch import cdiv, next_pow2

MAX_ROWS = 16  # the decode path's row limit: one MMA row tile
ROWS = tl.constexpr(MAX_ROWS)
# NOTE: Triton's interpreter (3.9) multiplies bfloat16 tiles as their raw uint16 bits; there both
# operands go to float32 first, which is exact and what the GPU's MMA accumulates anyway
DOT_IN_F32 = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true")
# NOTE: no float32: `tl.dot` multiplies float32 tiles in TF32 on NVIDIA, where F.linear stays IEEE
DENSE_FORMATS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class GemvConfig:
    """Tiles and launch options of one decode GEMM. `block_n`, `block_k`: powers of two >= 16 (`tl.dot`'s
    smallest tile); FP8 "block" needs block_k <= 128 (one weight scale per K step), MXFP4 block_k >= 32
    (whole scale groups). `split_k`: programs along K (fewer run where K has fewer tiles). `native_mma`
    (quantized weights only): the weight tiles go to the multiply as they are, instead of decoded to the
    activations' dtype in registers: FP8's to an fp8 MMA, MXFP4's codes and scales to `tl.dot_scaled`
    (Triton's own e2m1 upcast where the card has no MXFP4 MMA, the MMA itself where it has). `fma`
    (MXFP4 only): one row of x takes CUDA-core FMAs in registers, no MMA, with these tiles; more rows take
    the MMA kernel (the other fields) as if it were off. `f32_decode` (with `fma`): that kernel decodes
    each code straight into float32 bits rather than into float16 ones it then converts (more integer
    operations, no conversions: which is faster is the card's, so the sweep tries both)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    native_mma: bool = False
    fma: bool = False
    f32_decode: bool = False


# The shape rule for cards and shapes without a tuned entry. H100 / H200 have 132 SMs. Two programs an
# SM (~256) with a few tiles in flight each cover the memory latency; fewer programs leave SMs idle, so
# K is split until N's tiles and the splits make about that many, keeping >= 4 K steps per split so
# each program's pipeline fills. Wide N tiles (64) halve the re-reads of x (from L2) per weight byte;
# narrow ones (32) give small N twice the programs.
_MIN_PROGRAMS = 256
_MIN_STEPS = 4
_MAX_SPLIT = 16


def shape_rule(n: int, k: int, block_k: int, stages: int) -> GemvConfig:
    """The untuned config of a [n, k] weight walked `block_k` columns a step, `stages` deep on CUDA."""
    block_n = 64 if cdiv(n, 64) >= _MIN_PROGRAMS else 32
    n_tiles, k_steps, split = cdiv(n, block_n), cdiv(k, block_k), 1
    while n_tiles * split < _MIN_PROGRAMS and k_steps >= 2 * split * _MIN_STEPS and split < _MAX_SPLIT:
        split *= 2
    # NOTE: MI300's LDS is 64 KiB and its pipeliner counts stages differently: two stages fit every tile
    return GemvConfig(block_n, block_k, split, num_warps=4, num_stages=2 if is_hip() else stages)


def config_for(device: torch.device, fmt: str, n: int, k: int) -> GemvConfig | None:
    """The card's tuned config of (`fmt`, [n, k]), or None."""
    fields = gemv_tuned.lookup(device, fmt, n, k)
    return GemvConfig(**fields) if fields is not None else None


def check_config(
    cfg: GemvConfig, min_k: int, max_k: int, quantized: bool = False, has_fma: bool = False
) -> None:
    """Raise ValueError where `cfg` does not fit a format taking block_k in [min_k, max_k], of quantized
    weights or not, with a one-row FMA kernel (`has_fma`) or not."""
    if cfg.native_mma and not quantized:
        raise ValueError("native_mma: a config of quantized weights only")
    if cfg.fma and not has_fma:
        raise ValueError("fma: a config of MXFP4 weights only")
    if cfg.f32_decode and not cfg.fma:
        raise ValueError("f32_decode: a config of the one-row FMA kernel only (with fma)")
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
def store(acc, Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
          TILE_M: tl.constexpr = ROWS):  # fmt: skip
    """acc [TILE_M, BLOCK_N] (rows 0 .. TILE_M - 1 of x) to Out: float32 partials at split program_id(1)
    of [SPLIT_K, M, N], or the output rows (plus bias, in Out's dtype)."""
    offs_m = tl.arange(0, TILE_M)
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
def dot(x, w, DOT_IN_F32: tl.constexpr):
    """x [ROWS, BLOCK_K] @ w [BLOCK_N, BLOCK_K].T in float32, both in the activations' dtype (the
    interpreter's float32 copies of them: the same values)."""
    if DOT_IN_F32:
        x, w = x.to(tl.float32), w.to(tl.float32)
    return tl.dot(x, tl.trans(w))


@triton.jit
def slab(M, N, K, K_SPLIT, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's row, column and K-lane offsets, the rows' and columns' masks, and its K range."""
    offs_m = tl.arange(0, ROWS)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    return offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < M, offs_n < N, k_lo, k_hi


@triton.jit
def pointers(X, W, offs_m, offs_n, offs_k, k_lo, stride_xm, stride_wn):
    """The first K step's tile pointers into x [ROWS, BLOCK_K] and a row-major W [BLOCK_N, BLOCK_K]."""
    x_ptrs = X + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    return x_ptrs, w_ptrs


@triton.jit
def load_step(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, k_left):
    """One K step's tiles of x and W, zero outside the rows and past `k_left` columns. NOTE: with K and
    K_SPLIT divisible by 16 (Triton specializes on it) the K mask is constant over 16 elements, so the
    loads stay 16 bytes wide."""
    k_ok = (offs_k < k_left)[None, :]
    x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
    w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0.0)
    return x, w


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


def launch(
    kernel: triton.JITFunction,
    x: torch.Tensor,
    operands: tuple[torch.Tensor, ...],
    n: int,
    k: int,
    bias: torch.Tensor | None,
    cfg: GemvConfig,
    out_dtype: torch.dtype,
    **constexprs: int | str,
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
        DOT_IN_F32=DOT_IN_F32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **constexprs,
    )  # fmt: skip
    if partial:
        block = 1024
        _split_sum_kernel[(cdiv(m * n, block),)](
            dest, bias if bias is not None else x, out, m, n, SPLIT_K=splits, HAS_BIAS=bias is not None,
            BLOCK=block,
        )  # fmt: skip
    return out


def rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as the kernels take it: [M <= MAX_ROWS, K], unit stride along K."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        raise ValueError(f"decode GEMMs take x [M <= {MAX_ROWS}, K], got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------- dense weights


@triton.jit(do_not_specialize=["M"])
def _dense_gemv_kernel(
    X, W, Bias, Out, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = sum_k X[m, k] * W[n, k] (+ Bias[n]) over this program's K split, W in X's dtype."""
    offs_m, offs_n, offs_k, m_ok, n_ok, k_lo, k_hi = slab(M, N, K, K_SPLIT, BLOCK_N, BLOCK_K)
    x_ptrs, w_ptrs = pointers(X, W, offs_m, offs_n, offs_k, k_lo, stride_xm, stride_wn)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, w = load_step(x_ptrs, w_ptrs, m_ok, n_ok, offs_k, k_hi - k0)
        acc += dot(x, w, DOT_IN_F32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    store(acc, Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS, PARTIAL)


def dense_config(n: int, k: int) -> GemvConfig:
    """The untuned config of a dense [n, k] weight: K steps of 128 values (a [64, 128] bf16 tile is
    16 KiB; 4 stages in flight)."""
    return shape_rule(n, k, 128, 4)


def dense_gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight.T (+ bias) -> [M, N], weight [N, K] in x's dtype (bf16 or
    fp16), float32 sums.
    `config` defaults to the card's tuned one, else `dense_config`."""
    x = rows(x)
    if weight.dtype != x.dtype or x.dtype not in DENSE_FORMATS:
        raise ValueError(f"dense decode GEMM of {x.dtype} x {weight.dtype}: one of {list(DENSE_FORMATS)}")
    n, k = weight.shape
    fmt = DENSE_FORMATS[x.dtype]
    cfg = config or config_for(x.device, fmt, n, k) or dense_config(n, k)
    check_config(cfg, 16, 1 << 30)
    return launch(_dense_gemv_kernel, x, (weight.contiguous(),), n, k, bias, cfg, x.dtype)


def tuned_for(weight: torch.Tensor) -> bool:
    """Whether this card's table has a dense decode config for `weight`'s shape and dtype (the sweep
    saves one only where it beat cuBLAS)."""
    fmt = DENSE_FORMATS.get(weight.dtype)
    return weight.is_cuda and fmt is not None and config_for(weight.device, fmt, *weight.shape) is not None


def _dense_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@opaque_op("tessera::dense_linear", fake=_dense_linear_fake)
def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`, by the decode GEMM where x has at most MAX_ROWS rows: one op for every captured size
    (a layer calls it only where `tuned_for` its weight)."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= MAX_ROWS:
        return dense_gemv(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
