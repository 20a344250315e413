"""Process helpers shared by the built-in engine and the elastic workers (no torch, no CUDA)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

__all__ = ["ELASTIC_API_TOKEN_ENV", "EXIT_WITH_PARENT_ENV", "FORKSERVER_PRELOAD_ENV", "NVLS_OFF_ENV",
           "RANK_CONTEXT_ENV", "STANDBY_READY_FD_ENV", "alike_process", "disable_nvls", "exit_with_parent",
           "exit_with_parent_if_asked", "free_port", "port_problem"]

log = logging.getLogger("foundry_sglang.proc")

# The environment between our own processes (each variable is set by one side and read in one place; the
# user-facing FOUNDRY_* settings are foundry_sglang.graphs.settings'):
#: "1", set by supervisors (the elastic workers): stop when the supervising process goes away, so a Ctrl-C that
#: takes the supervisor down never leaves an orphaned server holding GPUs (:func:`exit_with_parent_if_asked`).
EXIT_WITH_PARENT_ENV = "FOUNDRY_EXIT_WITH_PARENT"
#: A multiprocessing start method the engine starts its ranks with (set by a standby whose forkserver has torch
#: imported; read by the engine; default spawn).
RANK_CONTEXT_ENV = "FOUNDRY_ENGINE_RANK_CONTEXT"
#: A file descriptor (a pipe from the elastic workers) a standby writes ``ready`` to once it is warm, then closes.
STANDBY_READY_FD_ENV = "FOUNDRY_STANDBY_READY_FD"
#: The bearer token of the elastic admin API (the default of the elastic launcher's ``--api-token``).
ELASTIC_API_TOKEN_ENV = "FOUNDRY_ELASTIC_API_TOKEN"
#: Comma-separated modules an SGLang standby's forkserver imports (set by ``plugin.forkserver.start`` in the
#: forkserver's own environment only; read when that process imports ``plugin.forkserver``).
FORKSERVER_PRELOAD_ENV = "FOUNDRY_FORKSERVER_PRELOAD"

#: NVLink multicast (NVLS) stays off in every process we start or run in: a program that uses it can put a
#: shared host's GPUs out of service, and Foundry refuses graphs that would hold multicast objects anyway.
NVLS_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


#: Run by a throwaway interpreter before it becomes the real command: address-space randomisation off for what it
#: execs (Linux ``personality(ADDR_NO_RANDOMIZE)``; where that is not allowed, it runs as it is).
_ALIKE_EXEC = ("import ctypes, os, sys\n"
               "try:\n"
               "    libc = ctypes.CDLL(None)\n"
               "    libc.personality(libc.personality(0xffffffff) | 0x0040000)\n"
               "except (OSError, AttributeError):\n"
               "    pass\n"
               "os.execvp(sys.argv[1], sys.argv[1:])\n")


def alike_process(cmd: list, env: Optional[dict] = None) -> tuple[list, dict]:
    """``cmd`` and its environment such that every process started this way lays out its memory the same way: no
    address-space randomisation and one Python hash seed. Uninitialised bytes (padding in kernel-argument structs)
    then hold the same stale values in each, where the control flow is the same. For the short-lived processes
    that capture a layout's virtual ranks (they serve no one); ``env`` defaults to this process's."""
    env = dict(os.environ if env is None else env, PYTHONHASHSEED="0")
    if not sys.platform.startswith("linux"):
        return list(cmd), env
    return [sys.executable, "-I", "-S", "-c", _ALIKE_EXEC, *cmd], env


def disable_nvls(env=None) -> dict:
    """Force :data:`NVLS_OFF_ENV` into ``env`` (default: this process's environment, before NCCL starts)."""
    target = os.environ if env is None else env
    target.update(NVLS_OFF_ENV)
    return target


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_problem(host: str, port: int) -> Optional[str]:
    """Why a server could not listen on ``host:port`` now (one line), or None when it could."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers bind: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def exit_with_parent(poll_s: float = 1.0, sig: int = signal.SIGTERM) -> None:
    """Send ourselves ``sig`` once our parent process has exited (SIGTERM: a clean shutdown where a handler is
    installed; a process that ignores SIGTERM passes SIGKILL)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("parent process %d exited; shutting down", parent)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exit_with_parent_if_asked() -> bool:
    """:func:`exit_with_parent` when the supervisor asked for it (``FOUNDRY_EXIT_WITH_PARENT=1``); whether it did."""
    if os.environ.get(EXIT_WITH_PARENT_ENV) != "1":
        return False
    exit_with_parent()
    return True
