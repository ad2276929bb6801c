"""Transforms applied to a built model: weight-only int8 quantization, and the CPU's batch-1 decode
kernels (C, compiled at first use). The model's torch code stays the reference."""
