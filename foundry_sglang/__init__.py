"""Foundry for SGLang: fast cold starts by restoring CUDA graphs, and live TP/EP switching."""
from foundry_core import __version__

__all__ = ["__version__"]
