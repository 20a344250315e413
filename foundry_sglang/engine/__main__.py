"""``python -m foundry_sglang.engine``: the built-in engine's OpenAI server.

A Foundry LOAD starts preparing (``foundry_sglang.engine.preload``) before the engine and torch are imported.
"""
import sys


def run() -> int:
    from .preload import start_from_argv

    early = start_from_argv(sys.argv[1:])
    from .server import main  # torch and the whole engine: seconds the early load runs beside

    return main(early=early)


sys.exit(run())
