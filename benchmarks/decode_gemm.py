"""`python -m benchmarks.decode_gemm`: how close each format's decode GEMMs come to reading their weights
at the card's copy bandwidth (GPU).

A decode step streams every weight once through skinny GEMMs (M <= 16 rows). For each Llama-3-8B linear
shape and M (`--rows`, default 1, 4, 8), each format's op is timed and its weight bytes divided by that
time, as a fraction of the device-to-device copy bandwidth measured in the same run. Formats: bf16
`F.linear` (cuBLAS) and the dense decode GEMM ("bf16_gemv", `tessera.layers.gemv`), the public ops
`tessera::fp8_linear` per-channel ("fp8") and block ("fp8_block") and `tessera::mxfp4_linear` ("mxfp4"),
which take `tessera.quant.gemv_kernels` up to its MAX_ROWS rows (FP8 where the card's table has the
shape), and their other paths, called directly: "fp8_scaled_mm" (per-token activation quantizer +
`torch._scaled_mm`), "fp8_block_gemm" (1x128 quantizer + the Triton block GEMM) and "mxfp4_tiled" (the
tiled MXFP4 GEMM).

Each op is captured in a CUDA graph that calls it once on each of as many copies of its weight as make
256 MiB (5x the L2 cache of an H100 / H200), and the replay time is divided by the number of calls. So
every call reads its weight from HBM (a weight that fits the L2 would otherwise be read from it on every
replay after the first), and the kernels follow each other as a decode step's do inside its graph.

`--sweep` also times the decode kernels themselves over a grid of `GemvConfig`s (at most 17 per format
and shape: N and K tiles, split K, warps, FP8's MMA input; MXFP4 at M = 1 also up to 18 of its one-row
FMA kernel) for bf16, fp8 per-channel, fp8 block and mxfp4, and reports the best config per (format,
shape, M) next to the default's time. `--save-configs DIR` writes, for each format and shape, the config
whose slowest M is closest to that M's best (where it beats the format's other path: `pick_configs`)
into DIR's table for this card (`tessera.layers.gemv_tuned`; the decode GEMMs read it from
`tessera/layers/gemv_configs/`, or from the folder `TESSERA_GEMV_CONFIGS` names). MXFP4's M = 1 is
picked and saved apart, as "mxfp4_m1": the config its one-row calls read.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import graph_ms, write_json
from benchmarks.quant import gpu_bandwidth
from tessera.layers import gemv, gemv_tuned
from tessera.quant import fp8, gemv_kernels, mxfp4, mxfp4_kernels
from tessera.quant.gemv_kernels import GemvConfig

# Llama-3-8B's linear layers (N, K), and its LM head
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # fmt: skip
ROTATE_BYTES = 256 * 2**20  # weight copies per graph: together 5x the 50 MiB L2 of an H100 / H200
MARGIN = 0.95  # a decode GEMM is saved where it takes under this much of its format's other path's time
# the path each format takes at decode sizes without a table entry (the MXFP4 decode GEMM has none)
OTHER_PATH = {"bf16": "bf16", "fp8": "fp8_scaled_mm", "fp8_block": "fp8_block_gemm"}
# formats whose one-row calls read a table entry of their own (`gemv_kernels.mxfp4_gemv`)
ONE_ROW = {"mxfp4": "mxfp4_m1"}
# a swept config whose result is this far from the default config's (relative, Frobenius) computes
# something else: bf16 outputs and float32 sums in another order differ by ~1e-3, FP8 MMAs that add
# within a K step below float32's precision by less than 1e-2
WRONG_ERR = 3e-2
SMEM_BUDGET = 96 * 2**10  # pipeline stages of a swept config: as many as fit this much shared memory
Op = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], Any]


def _old_fp8_scaled_mm() -> Op | None:
    mm = fp8._rowwise_mm(torch.device("cuda"))
    if mm is None:
        return None
    return lambda x, w: fp8._scaled_mm_linear(x, *w, None, mm)


def _old_fp8_block_gemm(x: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    xq, xs = fp8.quantize_act(x, fp8.BLOCK)
    return fp8.fp8_kernels.block_gemm(xq, xs, *w, None, x.dtype)


def formats(n: int, k: int) -> dict[str, tuple[Op, tuple[torch.Tensor, ...]]]:
    """Each format's GEMM over one random [n, k] weight: (op(x, weight tensors), weight tensors)."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ch = fp8.quantize_weight(w, "per_channel")  # in the platform's fp8 type
    bl = fp8.quantize_weight(w, "block")
    mx = mxfp4.quantize(w)
    out: dict[str, tuple[Op, tuple[torch.Tensor, ...]]] = {
        "bf16": (lambda x, t: F.linear(x, *t), (w,)),
        "bf16_gemv": (lambda x, t: gemv.dense_gemv(x, *t), (w,)),
        "fp8": (lambda x, t: fp8.fp8_linear(x, *t, "per_channel"), ch),
        "fp8_block": (lambda x, t: fp8.fp8_linear(x, *t, "block"), bl),
        "mxfp4": (lambda x, t: mxfp4.mxfp4_linear(x, *t), mx),
        "fp8_block_gemm": (_old_fp8_block_gemm, bl),
        "mxfp4_tiled": (lambda x, t: mxfp4_kernels.mxfp4_matmul(x, *t), mx),
    }
    scaled_mm = _old_fp8_scaled_mm()
    if scaled_mm is not None:  # row-wise scaled mm needs SM89+ and a recent build
        out["fp8_scaled_mm"] = (scaled_mm, ch)
    return out


def _nbytes(weight: tuple[torch.Tensor, ...]) -> int:
    return sum(t.nbytes for t in weight)


def _copies(weight: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """`weight` and clones of it, together at least ROTATE_BYTES."""
    count = max(1, -(-ROTATE_BYTES // _nbytes(weight)))
    return [weight] + [tuple(t.clone() for t in weight) for _ in range(count - 1)]


def time_op(op: Op, copies: list[tuple[torch.Tensor, ...]], x: torch.Tensor, bandwidth: float) -> dict:
    """{"us": GPU time per call, "of_copy_bandwidth": weight bytes / that time / `bandwidth`} of `op`,
    called once per weight copy inside one graph (see the module docstring)."""
    ms = graph_ms(lambda: [op(x, w) for w in copies], iters=20, reps=3) / len(copies)
    fraction = _nbytes(copies[0]) / (ms / 1e3) / bandwidth
    return {"us": round(ms * 1e3, 2), "of_copy_bandwidth": round(fraction, 3)}


def _stages(block_n: int, block_k: int, weight_bytes: float) -> int:
    """Pipeline stages of one tile of x (16 rows, bf16) and one of W that fit SMEM_BUDGET, 2 to 6."""
    stage = 16 * block_k * 2 + block_n * block_k * weight_bytes
    return int(max(2, min(6, SMEM_BUDGET // stage)))


def _splits(n_tiles: int, k_steps: int, programs: int = 256) -> int:
    """K splits for about `programs` programs (256: two an SM), each split two K steps at least."""
    split = 1
    while n_tiles * split < programs and k_steps >= 4 * split:
        split *= 2
    return split


SweepOp = Callable[[torch.Tensor, tuple[torch.Tensor, ...], GemvConfig], Any]


def _fp8_gemv(scheme: str) -> SweepOp:
    """The FP8 decode GEMM as the op calls it: the activation quantizer, then the kernel."""

    def call(x: torch.Tensor, w: tuple[torch.Tensor, ...], cfg: GemvConfig) -> torch.Tensor:
        xq, xs = fp8.quantize_act(x, fp8.act_group(scheme))
        return gemv_kernels.fp8_gemv(xq, xs, *w, scheme, x.dtype, config=cfg)

    return call


# per swept format: (the gemv call, its default config, the two K tiles swept, weight bytes per value)
SWEEP: dict[str, tuple[SweepOp, Callable[[int, int], GemvConfig], tuple[int, int], float]] = {
    "bf16": (lambda x, w, cfg: gemv.dense_gemv(x, *w, config=cfg), gemv.dense_config, (128, 256), 2.0),
    "fp8": (_fp8_gemv("per_channel"), lambda n, k: gemv_kernels.fp8_config("per_channel", n, k),
            (256, 512), 1.0),
    "fp8_block": (_fp8_gemv("block"), lambda n, k: gemv_kernels.fp8_config("block", n, k), (64, 128), 1.0),
    "mxfp4": (lambda x, w, cfg: gemv_kernels.mxfp4_gemv(x, *w, config=cfg),
              gemv_kernels.mxfp4_config, (256, 512), 17 / 32),
}  # fmt: skip


def sweep_configs(fmt: str, n: int, k: int, m: int) -> list[GemvConfig]:
    """The default config first, then N tiles 32 / 64 x the format's two K tiles x (no split; the split
    that makes ~256 programs, with 4 or 8 warps), with as many stages as fit: at most 13; quantized
    formats also the split one with `native_mma` (at most 17). MXFP4 at M = 1 also `_fma_configs` (at
    most 53); elsewhere `fma` is off in every config (the MMA kernel runs them all, the default too)."""
    _, default, block_ks, weight_bytes = SWEEP[fmt]
    one_row = m == 1 and fmt in ONE_ROW
    configs = [default(n, k) if one_row else dataclasses.replace(default(n, k), fma=False)]
    for block_n in (32, 64):
        for block_k in block_ks:
            split = _splits(-(-n // block_n), -(-k // block_k))
            stages = _stages(block_n, block_k, weight_bytes)
            for s, warps in ((1, 4), (split, 4), (split, 8)):
                cfg = GemvConfig(block_n, block_k, s, warps, stages)
                if cfg not in configs:
                    configs.append(cfg)
            if fmt != "bf16":  # the quantized tiles straight into the multiply
                configs.append(GemvConfig(block_n, block_k, split, 4, stages, native_mma=True))
    if one_row:
        configs += [cfg for cfg in _fma_configs(n, k) if cfg not in configs]
    return configs


def _fma_configs(n: int, k: int) -> list[GemvConfig]:
    """The one-row MXFP4 kernel's grid: N tiles 32 / 64 / 128 x K tiles 256 / 512 x (the split for ~256
    programs with 4 or 8 warps; the split for ~512 with 4 warps: more programs an SM to cover the
    loads' latency) x either decode (`f32_decode`). 4 stages, as the default (its loads feed no MMA): at
    most 36."""
    configs = []
    for f32_decode in (False, True):
        for block_n in (32, 64, 128):
            for block_k in (256, 512):
                n_tiles, k_steps = -(-n // block_n), -(-k // block_k)
                split, more = _splits(n_tiles, k_steps), _splits(n_tiles, k_steps, 512)
                for s, warps in ((split, 4), (split, 8), (more, 4)):
                    cfg = GemvConfig(block_n, block_k, s, warps, 4, fma=True, f32_decode=f32_decode)
                    if cfg not in configs:
                        configs.append(cfg)
    return configs


def sweep_case(fmt: str, copies: list[tuple[torch.Tensor, ...]], x: torch.Tensor, bandwidth: float) -> dict:
    """Every config of `sweep_configs` on one (format, shape, M): the best, the default's, all trials. A
    config is timed only where its result agrees with the default config's (within WRONG_ERR): a fast
    config that computes something else must never reach the table."""
    call = SWEEP[fmt][0]
    configs = sweep_configs(fmt, copies[0][0].shape[0], x.shape[1], x.shape[0])
    ref = call(x, copies[0], configs[0]).float()
    trials = []
    for cfg in configs:
        try:
            err = _rel_err(call(x, copies[0], cfg).float(), ref)
            if not err <= WRONG_ERR:  # (NaN too)
                timing: dict[str, Any] = {"error": f"wrong result: relative error {err:.3g} to the default's"}
            else:
                timing = time_op(lambda x, w, cfg=cfg: call(x, w, cfg), copies, x, bandwidth)
        except Exception as e:  # a config this card cannot compile or run (CompilationError, out of
            # resources, an MMA input type its Triton cannot lower): noted, and the sweep goes on
            timing = {"error": f"{type(e).__name__}: {e}"[:200]}
        trials.append({**vars(cfg), **timing})
    best = min((t for t in trials if "us" in t), key=lambda t: t["us"], default=None)
    return {"best": best, "default": trials[0], "trials": trials}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def pick_configs(swept: list[dict], cases: list[dict]) -> gemv_tuned.Found:
    """Per table format and shape, the config with the smallest worst ratio, over the swept M, of its
    time to that M's best time (one config serves every M of a shape); a format of ONE_ROW has M = 1
    picked apart, under its one-row name (the fastest config there, the one-row kernel's or an MMA one),
    and its other M under its own. Where a format has another path (bf16: cuBLAS; FP8: `_scaled_mm`, the
    block GEMM), only where the config beat that path's time in `cases` by MARGIN at every swept M;
    elsewhere None: the format keeps its other path."""
    other = {(c["format"], c["n"], c["k"], c["m"]): c["us"] for c in cases if "us" in c}
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for case in swept:
        fmt = ONE_ROW.get(case["format"], case["format"]) if case["m"] == 1 else case["format"]
        groups.setdefault((fmt, case["n"], case["k"]), []).append(case)
    fields = list(GemvConfig.__dataclass_fields__)
    table: gemv_tuned.Found = {}
    for (fmt, n, k), group in groups.items():
        ratios: dict[tuple[int, ...], list[float]] = {}  # config -> its time / the best, per M
        for case in group:
            timed = [t for t in case["trials"] if "us" in t]
            for trial in timed:
                ratio = trial["us"] / min(t["us"] for t in timed)
                ratios.setdefault(tuple(trial[f] for f in fields), []).append(ratio)
        everywhere = {cfg: max(r) for cfg, r in ratios.items() if len(r) == len(group)}
        if not everywhere:
            continue
        best = dict(zip(fields, min(everywhere, key=everywhere.__getitem__), strict=True))
        baseline = OTHER_PATH.get(fmt)
        if baseline is not None and not all(
            _time_of(best, c) < MARGIN * other.get((baseline, n, k, c["m"]), float("inf")) for c in group
        ):
            best = None
        table.setdefault(fmt, {})[gemv_tuned.shape_key(n, k)] = best
    return table


def _time_of(config: dict[str, int], case: dict) -> float:
    return next(t["us"] for t in case["trials"] if "us" in t and all(t[f] == v for f, v in config.items()))


def _row(shape: str, fmt: str, m: int, weight: tuple[torch.Tensor, ...], **fields: Any) -> dict[str, Any]:
    n, k = SHAPES[shape]
    return {"shape": shape, "n": n, "k": k, "format": fmt, "m": m, "weight_bytes": _nbytes(weight), **fields}


def _print(shape: str, fmt: str, m: int, timing: dict[str, Any], note: str = "") -> None:
    print(f"  {shape:<8} {fmt:<14} M={m}: {timing.get('us', 0):8.1f} us  "
          f"{timing.get('of_copy_bandwidth', 0):.2f} of copy bandwidth{note}", flush=True)  # fmt: skip


def run_shape(shape: str, rows: list[int], sweep: bool, bandwidth: float) -> tuple[list[dict], list[dict]]:
    """(the formats' rows, the sweep's cases) of one shape."""
    n, k = SHAPES[shape]
    cases, swept = [], []
    for fmt, (op, weight) in formats(n, k).items():
        copies = _copies(weight)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timing = time_op(op, copies, x, bandwidth)
            cases.append(_row(shape, fmt, m, weight, **timing))
            _print(shape, fmt, m, timing)
            if sweep and fmt in SWEEP and m <= gemv_kernels.MAX_ROWS:
                result = sweep_case(fmt, copies, x, bandwidth)
                swept.append(_row(shape, fmt, m, weight, **result))
                best = result["best"] or {}
                default = result["default"].get("of_copy_bandwidth")
                _print(shape, f"{fmt} best", m, best, f" (default {default}): {best}")
        del copies
        torch.cuda.empty_cache()
    return cases, swept


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, nargs="*", default=[1, 4, 8])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sweep", action="store_true", help="also time the decode kernels over a config grid")
    p.add_argument("--save-configs", type=Path, metavar="DIR", help="with --sweep: save the picked configs")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.save_configs and not args.sweep:
        p.error("--save-configs needs --sweep")
    bandwidth = gpu_bandwidth("benchmarks.decode_gemm")
    cases, swept = [], []
    for shape in args.shapes:
        shape_cases, shape_swept = run_shape(shape, args.rows, args.sweep, bandwidth)
        cases += shape_cases
        swept += shape_swept
    report = {"benchmark": "decode_gemm", "copy_bandwidth_bytes_per_s": bandwidth,
              "gemv_max_rows": gemv_kernels.MAX_ROWS, "rotate_bytes": ROTATE_BYTES,
              "cases": cases}  # fmt: skip
    if args.sweep:
        report["sweep"] = swept
        report["picked"] = pick_configs(swept, cases)
        if args.save_configs:
            path = gemv_tuned.save(args.save_configs, torch.cuda.get_device_name(), report["picked"])
            print(f"decode GEMM configs written to {path}")
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
