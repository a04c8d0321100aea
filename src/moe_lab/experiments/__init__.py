"""Experiments that are not training runs (each in its own sub-package)."""
