"""Standby SGLang servers: ``python -m foundry_sglang.plugin.standby [--device cuda --gpu N]``.

The SGLang counterpart of ``python -m foundry_sglang.engine --standby`` (same stdin protocol and ready pipe:
:func:`foundry_sglang.engine.standby.run_standby`). Warm-up, before any layout is known:

1. the forkserver starts and imports the scheduler side (:data:`SCHEDULER_MODULES`: torch, SGLang's scheduler,
   detokenizer and model runner, our plugin, and the served model's file) while this process imports the launcher side
   (:data:`LAUNCHER_MODULES`: SGLang's server arguments, HTTP server and engine, our launcher);
2. a process forked from it proves it warm (and, on GPU, that CUDA works there), and SGLang's
   ``_set_envs_and_config`` gets the hook that starts its processes from it (:mod:`.forkserver`);
3. on GPU this process initialises CUDA on its GPU (SGLang's launcher queries the device at start).

Then ``{"argv": [...]}`` on stdin runs ``foundry_sglang.launch.main(argv)`` here, as
``python -m foundry_sglang.launch ARGV`` would. What a switch still pays: SGLang's argument checks, its
processes' CUDA contexts, NCCL, weights, the KV pool and the graph restore. A module that does not import here
is named in one line and left to SGLang's launch; a forkserver that is not usable leaves SGLang on spawn.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from foundry_sglang.engine.standby import run_standby
from foundry_sglang.proc import exit_with_parent_if_asked

from . import forkserver

log = logging.getLogger("foundry_sglang.plugin.standby")

#: Imported in the forkserver: what every SGLang scheduler (and the detokenizer) process imports first. Not
#: ``sglang.srt.models.registry``: it imports every model file and skips those that fail, so a preloaded registry
#: would lack the models that query the GPU at import (the forkserver refuses CUDA). The served model's own file
#: is added (:func:`model_modules`).
SCHEDULER_MODULES = ("torch", "sglang.srt.managers.scheduler", "sglang.srt.managers.detokenizer_manager",
                     "sglang.srt.model_executor.model_runner", "foundry_sglang.plugin", "foundry_sglang.plugin.hooks")
#: Imported in the standby itself: what SGLang's launcher process imports.
LAUNCHER_MODULES = ("torch", "sglang.srt.server_args", "sglang.srt.plugins", "sglang.launch_server",
                    "sglang.srt.entrypoints.engine", "sglang.srt.entrypoints.http_server", "foundry_sglang.launch")


def model_modules(model_path: Optional[str]) -> List[str]:
    """SGLang's model files (``sglang.srt.models.X``) whose ``EntryClass`` is an architecture of ``model_path``'s
    config.json (read as text: nothing is imported); [] without a readable config."""
    try:
        with open(os.path.join(model_path or "", "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
        spec = importlib.util.find_spec("sglang.srt.models")
    except (OSError, ValueError, ImportError, AttributeError):
        return []
    if not archs or spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.py")):
            text = path.read_text(errors="replace")
            entry = [line for line in text.splitlines() if line.startswith("EntryClass")]
            if any(re.search(rf"\b{re.escape(a)}\b", line) for a in archs for line in entry):
                found.append(f"sglang.srt.models.{path.stem}")
    return found


def _import_all(names) -> dict:
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported in one line; SGLang's launch meets it again
            failed[name] = forkserver._one_line(exc)
    return failed


def _as_sglangs_launcher() -> None:
    """What SGLang's launcher sets for its processes, set here before the forkserver starts, so that processes
    forked from it have it too:

    * the open-file and stack limits (SGLang's ``set_ulimit``): glibc sizes a process's thread stacks from the
      stack limit it was started with, which a forked process cannot change;
    * ``SGLANG_NUMA_BIND_V2=0`` unless set: each scheduler then binds itself to its GPU's NUMA node (libnuma,
      inside the process) instead of being started through a ``numactl`` executable, which a fork cannot do
      (such a start is spawned, without the warm imports: :mod:`.forkserver`)."""
    os.environ.setdefault("SGLANG_NUMA_BIND_V2", "0")
    try:
        from sglang.srt.utils.common import set_ulimit

        set_ulimit()
    except Exception as exc:  # SGLang's launcher tries again, for itself
        log.info("standby: limits not raised ahead: %s", forkserver._one_line(exc))


def warm_up(device: str, gpu: int = 0, model_path: Optional[str] = None) -> None:
    """Imports, the scheduler forkserver and (on GPU) CUDA, as the module docstring says; ``model_path``: the
    served model, whose SGLang model file the forkserver imports too. Raises when SGLang itself cannot be
    imported (the standby then exits and a switch starts a fresh worker)."""
    importlib.import_module("sglang.srt.server_args")
    _as_sglangs_launcher()
    started = forkserver.start(list(SCHEDULER_MODULES) + model_modules(model_path))   # imports while this one does
    failed = _import_all(LAUNCHER_MODULES)
    report = forkserver.wait_warm(started, device)
    failed.update({f"{name} (forkserver)": why for name, why in report["failed"].items()})
    if failed:
        log.warning("standby: not imported ahead (SGLang's launch imports them itself): %s",
                    "; ".join(f"{name}: {why}" for name, why in failed.items()))
    log.info("standby: forkserver pid %s warm after %.1fs with %d module(s): %s", forkserver.forkserver_pid(),
             report["seconds"], len(report["ok"]), ", ".join(report["ok"]))
    why_not = forkserver.usable(report)
    if why_not is None:
        try:
            forkserver.install_hook()
        except Exception as exc:  # SGLang's engine module did not import: its launch fails the same way
            why_not = f"cannot hook SGLang's process start ({forkserver._one_line(exc)})"
    if why_not:
        log.warning("standby: SGLang's processes will be spawned: %s", why_not)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no usable CUDA GPU here")
        torch.cuda.set_device(gpu)
        torch.cuda.init()


def serve(argv: List[str]) -> int:
    """What ``python -m foundry_sglang.launch ARGV`` does, in this process."""
    from foundry_sglang.launch import main as launch_main

    return int(launch_main(argv) or 0)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m foundry_sglang.plugin.standby",
                                description="A warm SGLang launcher that waits on stdin for one JSON line "
                                            '{"argv": [...]} of python -m foundry_sglang.launch arguments.')
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="cuda: initialise CUDA ahead")
    p.add_argument("--gpu", type=int, default=0, help="the visible GPU whose CUDA this process initialises")
    p.add_argument("--model-path", default=None, help="the model it will serve: its SGLang model file is imported "
                                                      "ahead too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exit_with_parent_if_asked()
    return run_standby(args.device, args.gpu, serve=serve,
                       warm=lambda device, gpu: warm_up(device, gpu, args.model_path))


if __name__ == "__main__":
    sys.exit(main())
