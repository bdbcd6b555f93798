"""Quantization passes: `int8`, `smoothquant`, `int4`, `fp16`, and what they share (`common`)."""
