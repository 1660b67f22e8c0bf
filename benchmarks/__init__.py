"""Benchmarks of agriclip-jax. Run all with `python -m benchmarks [--quick] [--only NAME ...]`."""
