"""The `tessera` command line."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tessera", description="piecewise-CUDA-graph LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks (GPU)", add_help=False)
    bench.add_argument("which", choices=["graphs"])
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench" and args.which == "graphs":
        from tessera.bench.graphs import main as bench_graphs

        bench_graphs(rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
