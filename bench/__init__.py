"""Benchmarks: `python -m bench [accept|email|push|all]` (see BENCHMARKS.md)."""
