"""Fresh processes for the GPU tests: a command, or one function of a module of this package, run with the repo
and tests/ on PYTHONPATH, its output kept (and written to a log), under a time limit. At the limit its process
group gets SIGTERM (a function's ``finally`` blocks run: servers and engines stop), then SIGKILL; whatever it
left in its group when it ends is killed too.

    ran = run_function(save_archive, str(archive), timeout=300, log=out / "save.log")
    ran.value   # what save_archive returned (JSON), None if it raised or ran out of time

A function runs as ``python -m gpu.fresh MODULE NAME RESULT ARGS``: the module is imported by name in the new
process, so it must be importable (a module of this package); the arguments and the result travel as JSON
(paths as strings).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 20  # from SIGTERM to SIGKILL at a time-out


@dataclass
class Ran:
    """How a fresh process ended."""

    rc: int | None  # None: killed at the time limit
    output: str  # stdout and stderr, interleaved
    seconds: float
    value: object = None  # run_function: what the function returned

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def status(self) -> str:
        return f"killed after {self.seconds:.0f} s" if self.rc is None else f"rc={self.rc}"

    def why(self, lines: int = 1) -> str:
        """The status and the last output lines: the detail of a row about a process that failed."""
        last = [ln for ln in self.output.strip().splitlines() if ln.strip()][-lines:] or ["no output"]
        return f"{self.status}: " + " | ".join(last)


def environment(extra: dict | None = None) -> dict:
    """This process's environment with the repo and tests/ first on PYTHONPATH, plus ``extra``."""
    path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **(extra or {}))


def run_command(cmd: list[str], *, timeout: float, env: dict | None = None, log: Path | None = None,
                echo: bool = False, cwd: Path = REPO) -> Ran:
    """Run ``cmd`` in a new session; ``echo``: copy its output to ours as it comes (shown with ``pytest -s``)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=environment(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    lines: list[str] = []

    def pump():
        for text in proc.stdout:
            lines.append(text)
            if echo:
                sys.stdout.write(text)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)  # after a time-out, and whatever it left behind
    proc.wait()
    reader.join(10)
    ran = Ran(rc, "".join(lines), time.perf_counter() - t0)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(map(str, cmd))}\n{ran.status}, {ran.seconds:.1f} s\n{ran.output}")
    return ran


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:  # the group is gone
        pass


def run_function(func, *args, timeout: float, env: dict | None = None, log: Path | None = None,
                 echo: bool = False) -> Ran:
    """Call ``func(*args)`` in a fresh process; ``Ran.value`` is what it returned."""
    with tempfile.TemporaryDirectory(prefix="foundry-fresh-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "gpu.fresh", func.__module__, func.__qualname__, str(result),
               json.dumps(args, default=str)]
        ran = run_command(cmd, timeout=timeout, env=env, log=log, echo=echo)
        if result.exists():
            ran.value = json.loads(result.read_text())
    return ran


def main(module: str, name: str, result: str, args: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # at the time limit: unwind, so that finally blocks run
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    value = getattr(importlib.import_module(module), name)(*json.loads(args))
    Path(result).write_text(json.dumps(value, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
