"""Real pretrained models shipped by PyPI packages, located offline (demo, examples, slow tests)."""
