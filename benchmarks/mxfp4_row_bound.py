"""Where MXFP4's one-row decode GEMM spends its time (GPU only): the FMA kernel of
`tessera.quant.gemv_kernels` against variants of it that drop one part of its work each, at Llama-3-8B's
shapes with this card's tuned "mxfp4_m1" configs:

* `kernel`: the kernel as it is;
* `no_cvt`: the same loads and integer decode, the float16 -> float32 conversion replaced by a bitcast
  (wrong values: it times the conversion's share);
* `loads`: the loads and one float add per word (no decode at all: the memory's share);
* `f32_decode`: the kernel with its other decode (`GemvConfig.f32_decode`: each code straight into
  float32 bits, no conversion instruction, more integer ones); its largest relative difference from
  `kernel` is printed.

`python -m benchmarks.mxfp4_row_bound [--out FILE]`: microseconds and the fraction of the copy
bandwidth each reaches.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.common import graph_ms, write_json
from benchmarks.quant import gpu_bandwidth
from tessera.layers.gemv import config_for, launch, slab, store
from tessera.quant import mxfp4
from tessera.quant.gemv_kernels import MX_GROUP, MX_UNSCALE, mxfp4_config, mxfp4_gemv
from tessera.quant.gemv_kernels import _nibble_halves as halves

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
VARIANTS = {"no_cvt": 1, "loads": 2}


@triton.jit(do_not_specialize=["M"])
def _variant_kernel(
    X, Wq, Ws, Bias, Out, M, N, K, K_SPLIT, stride_xm, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    _, offs_n, _, _, n_ok, k_lo, k_hi = slab(M, N, K, K_SPLIT, BLOCK_N, BLOCK_K)
    rows = offs_n[:, None].to(tl.int64)
    w4 = tl.arange(0, MX_GROUP // 8)
    acc = tl.zeros([BLOCK_N, BLOCK_K // MX_GROUP], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kg = k0 // MX_GROUP + tl.arange(0, BLOCK_K // MX_GROUP)
        g_ok = kg * MX_GROUP < k_hi
        ok = n_ok[:, None] & g_ok[None, :]
        word = kg[None, :, None] * (MX_GROUP // 8) + w4[None, None, :]
        words = tl.load(Wq + rows[:, :, None] * stride_qn + word, mask=ok[:, :, None], other=0)
        x_at = X + kg[:, None] * MX_GROUP + 8 * w4[None, :]
        part = tl.zeros([BLOCK_N, BLOCK_K // MX_GROUP, MX_GROUP // 8], dtype=tl.float32)
        if MODE == 2:
            part += words.to(tl.float32, bitcast=True)
        else:
            for i in tl.static_range(4):
                bits = halves(words, i)
                x_lo = tl.load(x_at + i, mask=g_ok[:, None], other=0.0).to(tl.float32)
                x_hi = tl.load(x_at + 4 + i, mask=g_ok[:, None], other=0.0).to(tl.float32)
                part += bits.to(tl.float32, bitcast=True) * x_lo[None, :, :]
                part += (bits >> 16).to(tl.float32, bitcast=True) * x_hi[None, :, :]
        s = tl.load(Ws + rows * stride_sn + kg[None, :], mask=ok, other=0).to(tl.int32)
        acc += tl.sum(part, 2) * ((s << 23).to(tl.float32, bitcast=True) * MX_UNSCALE)
    store(tl.sum(acc, 1)[None, :], Out, Bias, offs_n, n_ok, M, N, stride_om, HAS_BIAS, PARTIAL, 1)


def run_shape(name: str, bandwidth: float) -> list[dict]:
    n, k = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    blocks, scales = mxfp4.quantize(w)
    x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
    cfg = config_for(x.device, "mxfp4_m1", n, k) or mxfp4_config(n, k)
    codes = blocks.contiguous().view(torch.int32)
    nbytes = blocks.numel() + scales.numel() + x.numel() * 2 + n * 2
    cfg = dataclasses.replace(cfg, fma=True, f32_decode=False)
    f32 = dataclasses.replace(cfg, f32_decode=True)
    calls = {
        "kernel": lambda: mxfp4_gemv(x, blocks, scales, config=cfg),
        "f32_decode": lambda: mxfp4_gemv(x, blocks, scales, config=f32),
    }
    for variant, mode in VARIANTS.items():
        calls[variant] = lambda mode=mode: launch(
            _variant_kernel, x, (codes, scales.contiguous()), n, k, None, cfg, x.dtype, MODE=mode
        )
    want = calls["kernel"]().float()
    got = calls["f32_decode"]().float()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    out = []
    for variant, fn in calls.items():
        us = graph_ms(fn) * 1e3
        frac = nbytes / (us / 1e6) / bandwidth
        print(f"  {name:8s} {variant:9s} {us:7.1f} us  {frac:.2f} of copy bandwidth", flush=True)
        out.append({"shape": name, "n": n, "k": k, "variant": variant, "us": round(us, 2),
                    "of_copy_bandwidth": round(frac, 3), "config": vars(cfg)} | (
                        {"max_rel_diff_vs_kernel": rel} if variant == "f32_decode" else {}))  # fmt: skip
    print(f"  {name:8s} f32_decode vs kernel: max relative difference {rel:.2e}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mxfp4_row_bound", description=__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    bandwidth = gpu_bandwidth("benchmarks.mxfp4_row_bound")
    cases = [case for shape in args.shapes for case in run_shape(shape, bandwidth)]
    report = {"benchmark": "mxfp4_row_bound", "copy_bandwidth_bytes_per_s": bandwidth, "cases": cases}
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
