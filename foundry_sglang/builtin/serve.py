"""``python -m foundry_sglang.engine``: the built-in engine's OpenAI server with Foundry's graph backend.

The flags are parsed once, before the engine and torch are imported (:func:`.early.parse_quietly`); a Foundry LOAD
starts preparing then (:func:`.early.start`), and the server, handed the parsed flags, builds every rank's graph
backend with :func:`.backend.make_graph_backend`.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .early import parse_quietly, start

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Start the early load for ``argv`` (default: the command line), then run the server."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse_quietly(argv)
    early = start(*parsed) if parsed is not None else None
    # torch and the whole engine, imported only now: seconds the early load runs beside
    from foundry_sglang.engine.server import main as serve

    from .backend import make_graph_backend

    return int(serve(argv, early=early, graph_backend_factory=make_graph_backend, parsed=parsed) or 0)
