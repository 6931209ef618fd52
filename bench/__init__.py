"""Reproducible benchmarks of the gateway against a direct upstream and a bare proxy."""
