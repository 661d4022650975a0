"""Benchmarks of tessera, run from the repository root as modules: `python -m benchmarks.NAME --help`."""
