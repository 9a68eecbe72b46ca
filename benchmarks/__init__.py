"""Benchmarks: ``python -m benchmarks`` (or ``make bench``) runs them and writes the tables in docs/performance.md."""
