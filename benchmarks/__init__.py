"""Benchmarks: scripts that print a table and write JSON (run with ``python -m``)."""
