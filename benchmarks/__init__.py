"""Benchmarks and the evaluation harness (run from the repository root: ``python -m benchmarks.eval``)."""
