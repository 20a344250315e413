"""Foundry LOAD started at process start by ``python -m foundry_sglang.engine``.

The server spends seconds importing torch and the engine and creating its CUDA context before its graph backend
opens the archive; the archive checks and the kernel images need none of that. :func:`parse_quietly` parses the
server's own flags once (``python -m foundry_sglang.engine`` hands the result on to the server), :func:`start`
works out the archive the graph backend will open (:func:`archive_target`, the one place that rule lives) and,
when that archive exists and may be loaded, starts ``foundry_core.preload`` for it; the backend's
``Session.open()`` adopts it later. Nothing here imports torch.

On by default (``FOUNDRY_EARLY_LOAD=0`` turns it off: ``FoundryConfig.early_load``), and then only for a
single-rank GPU server with ``--foundry-mode load`` or ``auto`` and an existing archive: TP/EP ranks are processes
of their own, and a rank template may first be saved by rank 0. Its kernel loads are one native call made without the
GIL, not hundreds of driver calls each taking the GIL back from the thread importing torch (bench/start.py, H100,
2026-12-07, medians of 5 starts: LOAD healthy 3.14 s with it, 3.40 s without, eager 3.07 s).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import foundry_core
from foundry_sglang.engine.config import EngineArgs
from foundry_sglang.engine.flags import build_arg_parser, configure_logging, engine_args_from
from foundry_sglang.graphs.settings import FoundryMode

from .keys import ArchiveTarget, archive_target

__all__ = ["early_target", "parse_quietly", "start", "start_from_argv"]


def early_target(args: EngineArgs) -> Optional[ArchiveTarget]:
    """The archive to start loading at process start, or None when the server will not load one here."""
    if (args.world_size != 1 or args.device == "cpu" or args.disable_cuda_graph
            or not args.foundry.enabled or not args.foundry.early_load):
        return None
    target = archive_target(args)
    if target.mode is FoundryMode.SAVE or not target.path.exists():
        return None
    return target


class _BadFlags(ValueError):
    pass


def _refuse(message: str):
    raise _BadFlags(message)


def parse_quietly(argv: Sequence[str]) -> Optional[tuple[argparse.Namespace, EngineArgs]]:
    """The server's flags and its EngineArgs (Foundry settings resolved, arguments validated), or None where the
    server's ``main()`` must parse ``argv`` itself: ``--help``, ``--standby``, or flags it will refuse (it reports
    them, once)."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        return None
    parser = build_arg_parser()
    parser.error = _refuse  # main() reports bad flags, once
    try:
        ns = parser.parse_args(argv)
        if ns.standby:
            return None
        args = engine_args_from(ns)
        args.validate()
    except (ValueError, argparse.ArgumentError):  # ConfigError is a ValueError
        return None
    return ns, args


def start(ns: argparse.Namespace, args: EngineArgs):
    """Set up logging as the server will and start the early load of the archive the graph backend will open;
    returns the ``foundry_core.EarlyLoad``, or None (no such archive here)."""
    target = early_target(args)
    if target is None:
        return None
    configure_logging(ns.log_level)  # so that the load's own log lines are not lost before main() sets it up
    return foundry_core.preload(target.path, target.key, device=target.device, rank=target.rank)


def start_from_argv(argv: Sequence[str]):
    """:func:`parse_quietly`, then :func:`start`; None where either gives nothing."""
    parsed = parse_quietly(argv)
    return start(*parsed) if parsed is not None else None
