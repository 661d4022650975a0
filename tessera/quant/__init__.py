"""Quantized weight formats and their kernels (FP8, GGUF, MXFP4)."""
