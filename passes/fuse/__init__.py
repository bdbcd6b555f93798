"""The `fuse` pass (ONNX Runtime fused contrib ops) and its pattern matchers."""
