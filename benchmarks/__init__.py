"""Benchmarks of gsr (run as modules, e.g. ``python -m benchmarks.bench_rasterizer``)."""
