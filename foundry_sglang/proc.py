"""Process helpers shared by the built-in engine and the elastic workers (no torch, no CUDA)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

__all__ = ["EXIT_WITH_PARENT_ENV", "exit_with_parent", "free_port"]

log = logging.getLogger("foundry_sglang.proc")

#: Set by supervisors (the elastic workers): stop when the supervising process goes away, so a Ctrl-C that takes
#: the supervisor down never leaves an orphaned server holding GPUs.
EXIT_WITH_PARENT_ENV = "FOUNDRY_EXIT_WITH_PARENT"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Send ourselves SIGTERM (a clean shutdown where a handler is installed) once our parent process has exited."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("parent process %d exited; shutting down", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
