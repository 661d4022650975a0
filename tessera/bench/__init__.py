"""Benchmarks behind `tessera bench ...`; they need a GPU."""
