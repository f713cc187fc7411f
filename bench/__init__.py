"""Planetary Mesh side by side with Dask and Ray: `python -m bench` (see docs/benchmarks.md)."""
