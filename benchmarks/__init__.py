"""Benchmark harness comparing flowcore with Ray and Dask (see README.md)."""
