"""The `slimc` command line, the demo, and benchmark tools."""
