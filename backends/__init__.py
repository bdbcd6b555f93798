"""Backends lower the IR to something that runs and measure it."""
