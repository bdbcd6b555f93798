"""The torch backend: slimc's IR lowered to a trainable `torch.fx.GraphModule` whose quantized and
sparse matmuls are Triton kernels (`slimc.kernels`). See `lower` and `module`."""
