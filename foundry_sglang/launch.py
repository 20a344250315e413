"""``python -m foundry_sglang.launch``: start SGLang (or the built-in engine) with Foundry's fast cold starts.

Our own flags are listed in ``--help``; every other flag goes unchanged to SGLang's launcher (the same as
``python -m sglang.launch_server``: ``load_plugins(); run_server(prepare_server_args(argv))``), so ``--model`` /
``--model-path`` and all SGLang flags mean what SGLang says. Our flags (and ``FOUNDRY_*`` in the environment for
what they leave unset) become one ``FoundryConfig`` (:func:`foundry_config`); it reaches the plugin in every spawned
SGLang scheduler process as environment (``FoundryConfig.to_env``), the built-in engine as its own flags
(``FoundryConfig.engine_flags``) and the elastic launcher as environment.

Dispatch: ``--elastic`` → the elastic TP/EP controller (``foundry_sglang.elastic.launch.main``); SGLang importable,
a real model and a CUDA GPU → SGLang; otherwise (or ``--foundry-engine builtin``) → the built-in engine
(``foundry_sglang.engine.server.main``), with a log line saying why.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import replace
from typing import Callable, Optional, Sequence

from foundry_sglang.builtin.serve import main as serve_builtin
from foundry_sglang.graphs.settings import (
    DEFAULT_ARCHIVE_DIR,
    ENV_ARCHIVE,
    ENV_RANKS_SHARE_GPU,
    FoundryConfig,
    FoundryMode,
    add_foundry_flags,
)
from foundry_sglang.plugin.flags import PINS, UnsafeFlag, check_flags

log = logging.getLogger("foundry_sglang.launch")

ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT_NAME = "foundry"


class LaunchError(Exception):
    """A one-line reason the launcher cannot start; printed without a traceback, exit status 2."""


class UsageError(LaunchError):
    """A flag the chosen engine does not know (or a bad value): printed after the launcher's usage line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m foundry_sglang.launch",
        description="Launch SGLang with CUDA graphs saved to / restored from a Foundry archive "
                    "(or the built-in engine when SGLang is not installed).",
        epilog="Every other flag (e.g. --model/--model-path, --tp-size, --port, --cuda-graph-max-bs-decode) is "
               "passed unchanged to SGLang's launcher; see `python -m sglang.launch_server --help`. Example: "
               "python -m foundry_sglang.launch --model Qwen/Qwen3-8B --foundry-archive /data/foundry --port 30000",
        allow_abbrev=False,  # never let a prefix of an SGLang flag be taken as ours
    )
    add_foundry_flags(parser, archive_help=f"directory of per-rank graph archives (default: ${ENV_ARCHIVE} or "
                                           f"{DEFAULT_ARCHIVE_DIR}); file names encode the model, rank layout and a "
                                           "hash of every graph-relevant input")
    parser.add_argument("--foundry-engine", choices=("auto", "sglang", "builtin"), default="auto",
                        help="auto (default): SGLang if it can be imported, a CUDA GPU is present and --model is not a "
                             "builtin: preset; else the built-in engine. sglang/builtin: insist on one")
    parser.add_argument("--foundry-ranks-share-gpu", action="store_true",
                        help="run every rank of a TP/EP server on --base-gpu-id (each rank its own NCCL host id, "
                             "NCCL over loopback sockets): one GPU saves the rank template of a layout that fits "
                             f"in its memory; slower collectives, for saving templates and testing "
                             f"(default: ${ENV_RANKS_SHARE_GPU}=1)")
    parser.add_argument("--elastic", action="store_true",
                        help="start the elastic TP/EP controller (Ray) instead of a single server; "
                             "reserved for foundry_sglang.elastic")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the rest in their original order (SGLang's / the engine's flags, untouched).
    With --elastic, -h/--help belongs to the elastic launcher, which has flags of its own."""
    argv = list(argv)
    help_flags = [a for a in argv if a in ("-h", "--help")] if "--elastic" in argv else []
    ours, rest = build_parser().parse_known_args([a for a in argv if a not in help_flags])
    return ours, rest + help_flags


def apply_pins(rest: list[str]) -> tuple[list[str], list[str]]:
    """Add the flags Foundry pins (plugin.PINS) unless the user chose one of the alternatives; returns (argv, added)."""
    added: list[str] = []
    present = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
    for alternatives, pin in PINS:
        if not present.intersection(alternatives):
            added += pin
    return rest + added, added


def foundry_config(ours: argparse.Namespace, environ: Optional[dict] = None) -> FoundryConfig:
    """The launcher's Foundry settings: our flags win over ``FOUNDRY_*`` in the environment, and the archive
    directory defaults to DEFAULT_ARCHIVE_DIR (so the mode defaults to auto)."""
    try:
        return FoundryConfig.from_flags(ours, environ, env_defaults=True, default_archive_dir=DEFAULT_ARCHIVE_DIR)
    except ValueError as err:
        raise LaunchError(str(err)) from None


def sglang_available() -> Optional[str]:
    """None if SGLang's launcher can be imported, else why not (one line)."""
    try:
        importlib.import_module("sglang.srt.server_args")
        importlib.import_module("sglang.srt.plugins")
    except Exception as err:  # ImportError, or a broken install raising something else at import
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def plugin_installed() -> bool:
    """Whether load_plugins() will find our entry point (the package must be pip-installed)."""
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT_NAME for ep in entry_points(group=ENTRY_POINT_GROUP))


def _resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_sglang(rest: list[str], config: FoundryConfig) -> int:
    """Check flags, hand ``config`` to the plugin through the environment, then do what
    ``python -m sglang.launch_server`` does."""
    mode = config.mode
    if mode is not FoundryMode.OFF:
        if not plugin_installed():
            raise LaunchError("the foundry SGLang plugin entry point is not installed; run `pip install -e .` "
                              "in the foundry-sglang checkout (or use --foundry-mode off)")
        allowed = os.environ.get("SGLANG_PLUGINS", "")
        if allowed and ENTRY_POINT_NAME not in {x.strip() for x in allowed.split(",")}:
            raise LaunchError(f"SGLANG_PLUGINS={allowed!r} excludes the plugin '{ENTRY_POINT_NAME}'; add it")
        rest, added = apply_pins(rest)
        if added:
            log.info("foundry: pinned %s", " ".join(added))
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(rest)
    nccl_only = mode is not FoundryMode.OFF or config.ranks_share_gpu
    if nccl_only and server_args.tp_size > 1 and not server_args.disable_custom_all_reduce:
        # Custom all-reduce kernels hold IPC-mapped peer addresses no restore can re-create (plugin.parallel),
        # and need one GPU per rank.
        server_args.disable_custom_all_reduce = True
        log.info("foundry: added --disable-custom-all-reduce (TP graphs use NCCL all-reduces)")
    if nccl_only and server_args.tp_size > 1 and getattr(server_args, "flashinfer_allreduce_fusion_backend", None):
        # SGLang 0.5.17 turns FlashInfer's all-reduce fusion on by itself for some MoE models with TP > 1 on
        # Hopper/Blackwell; its IPC workspace is as unrestorable as custom all-reduce's (plugin.parallel).
        server_args.enforce_disable_flashinfer_allreduce_fusion = True
        server_args.flashinfer_allreduce_fusion_backend = None
        log.info("foundry: added --enforce-disable-flashinfer-allreduce-fusion (TP graphs use NCCL all-reduces)")
    if mode is not FoundryMode.OFF:
        try:
            reason = check_flags(server_args, mode)
        except UnsafeFlag as err:
            raise LaunchError(str(err)) from None
        if reason:
            log.warning("foundry: off for this server: %s", reason)
            config = replace(config, mode=FoundryMode.OFF)
    os.environ.update(config.to_env())
    log.info("foundry: mode=%s archive=%s; starting SGLang", config.mode, config.archive_dir or "-")
    from sglang.srt.plugins import load_plugins

    load_plugins()
    run_server = _resolve("sglang.launch_server:run_server")
    try:
        run_server(server_args)
    finally:
        kill_process_tree = _resolve("sglang.srt.utils:kill_process_tree")
        kill_process_tree(os.getpid(), include_parent=False)
    return 0


def check_builtin_flags(argv: list[str]) -> None:
    """UsageError (one line, at once: before torch or the engine is imported) for a flag the built-in engine
    does not take or a bad value, so a typo is reported as the launcher's own error."""
    from foundry_sglang.engine.flags import build_arg_parser

    def refuse(message: str):
        raise UsageError(f"{message} (the built-in engine's flags: python -m foundry_sglang.engine --help)")

    parser = build_arg_parser()
    parser.error = refuse  # type: ignore[method-assign]
    parser.parse_args(argv)


def run_builtin(rest: list[str], config: FoundryConfig) -> int:
    """The built-in engine; ``config`` goes to its own --foundry-archive/--foundry-mode flags
    (``FoundryConfig.engine_flags``; flags the user already gave it win). A Foundry LOAD starts preparing before
    the engine (and torch) is imported."""
    present = {a.split("=", 1)[0] for a in rest}
    flags = config.engine_flags()
    extra: list[str] = []
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag not in present:
            extra += [flag, value]
    check_builtin_flags(rest + extra)
    return serve_builtin(rest + extra)


def run_elastic(rest: list[str], config: FoundryConfig) -> int:
    """The elastic launcher, with ``config`` as the defaults of its own Foundry flags (environment)."""
    os.environ.update(config.to_env())
    main = _resolve("foundry_sglang.elastic.launch:main")
    return int(main(rest) or 0)


def builtin_preferred(rest: Sequence[str]) -> Optional[str]:
    """Why ``--foundry-engine auto`` should run the built-in engine although SGLang imports, or None."""
    model = _flag_value(rest, ("--model", "--model-path"))
    if model is None:
        return "no --model given: the built-in engine serves its default builtin:tiny"
    if model.startswith("builtin:"):
        return f"{model} is a built-in preset"
    return cuda_missing()


def cuda_missing() -> Optional[str]:
    """Why this machine cannot run CUDA (one line), or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def _flag_value(rest: Sequence[str], names: Sequence[str]) -> Optional[str]:
    """The value the last of the flags ``names`` gets in ``rest`` (``--flag V`` or ``--flag=V``), or None."""
    value = None
    for i, arg in enumerate(rest):
        for flag in names:
            if arg == flag and i + 1 < len(rest):
                value = rest[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse our flags and dispatch; returns the exit status (2 with a one-line message on bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours, rest = split_argv(sys.argv[1:] if argv is None else argv)
    try:
        config = foundry_config(ours)
        if ours.elastic:
            return run_elastic(rest, config)
        if ours.foundry_engine == "builtin":
            log.info("running the built-in engine (--foundry-engine builtin)")
            return run_builtin(rest, config)
        # auto: the cheap reasons first, so that the built-in engine (and a typo in its flags) is not kept
        # waiting for SGLang's import
        why_not = builtin_preferred(rest) if ours.foundry_engine == "auto" else None
        if why_not is None:
            why_not = sglang_available()
        if why_not is None and ours.foundry_engine == "sglang" and _flag_value(rest, ("--device",)) in (None, "cuda"):
            missing = cuda_missing()
            if missing:
                raise LaunchError(f"--foundry-engine sglang: {missing}, and SGLang needs one here; run the "
                                  "built-in engine on CPU instead (--foundry-engine auto or builtin)")
        if why_not is None:
            return run_sglang(rest, config)
        if ours.foundry_engine == "sglang":
            raise LaunchError(f"--foundry-engine sglang: SGLang cannot be used ({why_not})")
        log.warning("not using SGLang (%s); running the built-in engine instead", why_not)
        return run_builtin(rest, config)
    except LaunchError as err:
        if isinstance(err, UsageError):
            build_parser().print_usage(sys.stderr)
        print(f"foundry_sglang.launch: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("foundry_sglang."):
            print(f"foundry_sglang.launch: error: {err.name} is not available in this installation", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
