"""Surrogate model architectures (importable as ``models.<module>:<Class>``)."""
