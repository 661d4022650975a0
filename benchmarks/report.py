"""Markdown tables (and the step-time plot) from the benchmark JSON under benchmarks/results/.

    python -m benchmarks.report step benchmarks/results/step_h200.json --plot docs/step_smollm2_h200.png
    python -m benchmarks.report serve benchmarks/results/serve_smollm2_h200.json
    python -m benchmarks.report graphs benchmarks/results/graphs_h200.json
    python -m benchmarks.report moe-padding benchmarks/results/moe_padding_h200.json
    python -m benchmarks.report attention-mixed benchmarks/results/attention_mixed_h200.json

The README's tables are this script's output, pasted; the plot needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _ms(ms: float, floor: float | None) -> str:
    return f"{ms:.2f} ({ms / floor:.2f}×)" if floor else f"{ms:.2f}"  # noqa: RUF001


def step_tables(report: dict[str, Any]) -> str:
    out = []
    for m in report["models"]:
        variants = list(dict.fromkeys(v for row in m["cases"] for v in row["ms"]))
        title = f"**{m['model']}** on {report['gpu']}, ms per step (× = ratio to the kernel-time floor)\n"  # noqa: RUF001
        out.append(title)
        out.append("| batch | floor | " + " | ".join(variants) + " |")
        out.append("|---|---|" + "---|" * len(variants))
        for row in m["cases"]:
            floor = row["kernel_floor_ms"]
            label = f"{row['kind']} {row['size']}" + (
                f" ({row['seqs']} seqs)" if row["kind"] == "extend" else ""
            )
            cells = [_ms(row["ms"][v], floor) if v in row["ms"] else "" for v in variants]
            out.append(f"| {label} | {floor:.2f} | " + " | ".join(cells) + " |")
        notes = []
        if "startup_seconds" in m:
            notes.append("Start-up: " + ", ".join(f"{v} {s:.1f} s" for v, s in m["startup_seconds"].items()))
        if "kernels_per_step" in m["cases"][0]:
            kernels = m["cases"][0]["kernels_per_step"]
            notes.append("Kernels per step (first row): " + ", ".join(f"{v} {k}" for v, k in kernels.items()))
        if m.get("partial"):
            notes.append(f"Partial: {m['source']}; not run: {m['not_run']}")
        out.append("\n" + ". ".join(notes) + ".\n")
    return "\n".join(out)


def step_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rows = [r for r in m["cases"] if r["kind"] == "extend" and r["seqs"] == 1]
        sizes = [r["size"] for r in rows]
        ax.plot(sizes, [r["kernel_floor_ms"] for r in rows], "k--", label="kernel floor")
        for v in dict.fromkeys(v for r in rows for v in r["ms"]):
            ax.plot(sizes, [r["ms"][v] for r in rows], marker="o", label=v)
        ax.set(xscale="log", yscale="log", xlabel="EXTEND tokens N (one sequence)", ylabel="ms per step",
               title=f"{m['model']} on {report['gpu']}")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def serve_table(report: dict[str, Any]) -> str:
    out = [f"{report['device']}: total tok/s (output tok/s), median TTFT / TPOT in ms\n",
           "| server flags | concurrency | total tok/s | output tok/s | TTFT | TPOT | failed |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["runs"]:
        flags = (r["server_flags"] or "").strip() or "(defaults: all graphs)"
        conc = r["settings"]["max_concurrency"]
        out.append(
            f"| `{flags}` | {conc} | {r['total_tok_s']:.0f} | {r['output_tok_s']:.0f} | "
            f"{r['ttft']['median_ms']:.0f} | {r['tpot']['median_ms']:.1f} | {r['failed']} |"
        )
    return "\n".join(out)


def graphs_table(report: dict[str, Any]) -> str:
    steps = report["step_ms"]
    sizes = list(steps["kernel-floor"])
    out = ["| variant | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for variant, times in steps.items():
        floor = steps["kernel-floor"]
        out.append(f"| {variant} | " + " | ".join(_ms(times[n], floor[n]) for n in sizes) + " |")
    return "\n".join(out)


def moe_padding_table(report: dict[str, Any]) -> str:
    """One row per (MoE layer, N -> S): each expert backend's ms alone / padded (ratio)."""
    backends = list(dict.fromkeys(r["experts"] for r in report["rows"]))
    header = " | ".join(f"{b}: alone / padded (ratio)" for b in backends)
    out = [f"| MoE layer | N real → S padded | {header} |", "|---|---|" + "---|" * len(backends)]
    cells: dict[tuple[str, int, int], dict[str, str]] = {}
    for r in report["rows"]:
        cell = f"{r['ms']['alone']:.3f} / {r['ms']['padded']:.3f} ({r['ratio']:.3f})"
        cells.setdefault((r["model"], r["real"], r["padded_to"]), {})[r["experts"]] = cell
    for (model, n, size), by in cells.items():
        out.append(f"| {model} | {n} → {size} | " + " | ".join(by.get(b, "") for b in backends) + " |")
    return "\n".join(out)


def attention_mixed_table(report: dict[str, Any]) -> str:
    out = [
        "| shape | decodes | one launch | two launches | decodes alone | chunk alone |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ms = r["ms"]
        speedup = ms["one_launch"] / ms["two_launches"]
        out.append(f"| {r['shape']} | {r['decodes']} | {ms['one_launch']:.3f} | {ms['two_launches']:.3f} "
                   f"({speedup:.2f}x faster) | "
                   f"{ms['decodes_alone']:.3f} | {ms['chunk_alone']:.3f} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=list(TABLES))
    p.add_argument("json", type=Path)
    p.add_argument("--plot", type=Path, default=None, help="step: write the time-vs-N plot here")
    args = p.parse_args()
    report = json.loads(args.json.read_text())
    print(TABLES[args.kind](report))
    if args.plot is not None and args.kind == "step":
        step_plot(report, args.plot)


TABLES = {
    "step": step_tables,
    "serve": serve_table,
    "graphs": graphs_table,
    "moe-padding": moe_padding_table,
    "attention-mixed": attention_mixed_table,
}

if __name__ == "__main__":
    main()
