"""Foundry for SGLang: fast cold starts by restoring CUDA graphs, and live TP/EP switching."""
__version__ = "0.1.0"
