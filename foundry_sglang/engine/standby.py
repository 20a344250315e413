"""Standby engine processes: started before they are needed, given their arguments later.

``python -m foundry_sglang.engine --standby [--device cuda]`` imports torch and the whole engine, starts a
forkserver that has torch imported too (so the ranks > 0 a TP/EP engine starts later fork from it instead of
paying a fresh interpreter and ``import torch``) and, on GPU, creates the CUDA context. Then it waits on stdin
for exactly one line, a JSON object ``{"argv": ["--model", "builtin:tiny", "--tp", "2", ...]}`` with the
engine server's ordinary arguments, and runs the server with them as if it had been started that way.

Only the process that started the standby can give it arguments: stdin is a pipe, nothing listens on a
network. The message is JSON (no pickle) and is checked before use; end of input (the parent closed the pipe
or died) ends the standby quietly.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, List, Optional, TextIO

from foundry_sglang import jsonsafe
from foundry_sglang.proc import RANK_CONTEXT_ENV, STANDBY_READY_FD_ENV

log = logging.getLogger("foundry_sglang.engine.standby")

#: Modules the forkserver imports once, so forked ranks start with them loaded.
FORKSERVER_PRELOAD = ["torch", "foundry_sglang.engine.engine"]
MAX_MESSAGE = 1 << 20


class StandbyMessageError(ValueError):
    """The line a standby received is not ``{"argv": [str, ...]}``."""


def parse_message(line: str) -> List[str]:
    """The engine arguments carried by one standby message (StandbyMessageError, one line, otherwise)."""
    if len(line) > MAX_MESSAGE:
        raise StandbyMessageError(f"standby message longer than {MAX_MESSAGE} bytes")
    try:
        msg = jsonsafe.loads(line)
    except jsonsafe.MalformedJSON as e:
        raise StandbyMessageError(f"standby message is not JSON: {e}") from None
    if not isinstance(msg, dict) or set(msg) != {"argv"}:
        raise StandbyMessageError('standby message must be {"argv": [...]} and nothing else')
    argv = msg["argv"]
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise StandbyMessageError("standby argv must be a list of strings")
    if any(_names_standby(a) for a in argv):
        raise StandbyMessageError("standby argv must not ask for another standby")
    return argv


def _names_standby(arg: str) -> bool:
    """``--standby``, ``--standby=...`` or a prefix of it (which argparse would take for it if abbreviations
    were allowed)."""
    name = arg.split("=", 1)[0]
    return len(name) > 2 and name.startswith("--") and "--standby".startswith(name)


def _nothing() -> None:
    pass


def warm_up(device: str, gpu: int = 0) -> None:
    """Do now what every engine start would otherwise wait for: imports, the rank forkserver, the CUDA context."""
    import importlib
    import multiprocessing
    import os

    import torch

    importlib.import_module("foundry_sglang.engine.server")  # the engine, its model code and aiohttp

    os.environ[RANK_CONTEXT_ENV] = "forkserver"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    probe = ctx.Process(target=_nothing, name="forkserver-probe")
    probe.start()        # answered only once the forkserver has imported FORKSERVER_PRELOAD: then it is warm
    probe.join()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--standby --device cuda: no usable CUDA GPU here")
        torch.cuda.set_device(gpu)
        torch.zeros(1, device=f"cuda:{gpu}")   # the primary context of the standby's GPU


def wait_for_argv(stream: TextIO) -> Optional[List[str]]:
    """Block until the parent sends the engine arguments; None at end of input."""
    line = stream.readline(MAX_MESSAGE + 1)
    if not line.strip():
        return None
    return parse_message(line)


def _signal_ready() -> None:
    import os

    fd = os.environ.pop(STANDBY_READY_FD_ENV, "")
    if fd.isdigit():
        try:
            os.write(int(fd), b"ready\n")
            os.close(int(fd))
        except OSError:   # the parent stopped listening: it will still send arguments or close stdin
            pass


def run_standby(device: str, gpu: int = 0, stream: Optional[TextIO] = None,
                serve: Optional[Callable[[List[str]], int]] = None,
                warm: Callable[[str, int], None] = warm_up) -> int:
    """``warm(device, gpu)``, wait for arguments, then ``serve(argv)`` (the server's ``main`` with the standby's
    own settings) and return its exit status. The protocol is the same for every server a standby becomes."""
    t0 = time.monotonic()
    try:
        warm(device, gpu)
    except Exception as e:  # the parent falls back to a fresh engine when this process exits
        log.error("standby could not warm up: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return 1
    log.info("standby warm after %.2fs; waiting for engine arguments on stdin", time.monotonic() - t0)
    _signal_ready()
    t1 = time.monotonic()
    try:
        argv = wait_for_argv(stream or sys.stdin)
    except StandbyMessageError as e:
        log.error("%s", e)
        return 2
    if argv is None:
        log.info("standby: input closed before any arguments came; exiting")
        return 0
    log.info("standby: arguments received after %.2fs idle; starting the engine", time.monotonic() - t1)
    return serve(argv)
