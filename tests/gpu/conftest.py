"""Fixtures of the GPU tests: the skips, where a test's files go, its verdict table and its JSON record.

Without a CUDA GPU every test here skips at collection: the pytest process never touches CUDA (torch counts the
GPUs once, in a fresh process, and only where a CUDA driver is installed). ``two_gpu`` tests skip where fewer
than two GPUs are visible, ``sglang`` tests where sglang is not importable.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from gpu.fidelity import Runner, report
from gpu.fresh import run_command, run_function
from gpu.records import write_record
from gpu.verdicts import Verdicts

_PROBE = ("import json, torch; print(json.dumps([torch.cuda.get_device_name(i) "
          "for i in range(torch.cuda.device_count())]))")
_REPORTED: list[Verdicts] = []  # every test's table, printed again at the end of the session


@functools.cache
def visible_gpus() -> tuple[str, ...]:
    """Names of the CUDA GPUs torch sees (CUDA_VISIBLE_DEVICES applies); () without a CUDA driver."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ()
    ran = run_command([sys.executable, "-c", _PROBE], timeout=300)
    try:
        return tuple(json.loads(ran.output.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        return ()


def _skip_reason(item, gpus: tuple[str, ...]) -> str | None:
    if not gpus:
        return "needs a CUDA GPU"
    if item.get_closest_marker("two_gpu") and len(gpus) < 2:
        return f"needs 2 CUDA GPUs ({len(gpus)} visible)"
    if item.get_closest_marker("sglang") and importlib.util.find_spec("sglang") is None:
        return "needs sglang importable (stage it: docs/STAGING.md)"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    gpus = visible_gpus()
    for item in gpu_items:
        reason = _skip_reason(item, gpus)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter):
    if _REPORTED:
        terminalreporter.section("GPU verdicts")
        for verdicts in _REPORTED:
            terminalreporter.write_line(verdicts.table())


@pytest.fixture(scope="module")
def module_dir(request, tmp_path_factory) -> Path:
    """The test module's folder: $OUT/<module> when $OUT is set (it comes back from the GPU machine), else a
    temporary folder of pytest's."""
    name = Path(request.node.path).stem
    if not os.environ.get("OUT"):
        return tmp_path_factory.mktemp(name)
    path = Path(os.environ["OUT"]) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def out_dir(request, module_dir) -> Path:
    """The test's folder for logs and archives: <module folder>/<test>."""
    path = module_dir / re.sub(r"[^\w.-]+", "_", request.node.name).strip("_")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def gpu_count() -> int:
    return len(visible_gpus())


@pytest.fixture
def verdicts(request, out_dir):
    """The test's verdict table; at the end of the test it is printed and written, with the figures the test
    put in ``verdicts.figures``, to <module folder>/<test>.json."""
    v = Verdicts(title=f"{Path(request.node.path).stem}::{request.node.name}")
    yield v
    if v.rows:  # none when the test skipped
        print(f"\n{v.table()}")
        _REPORTED.append(v)
        write_record(out_dir.parent / f"{out_dir.name}.json", v, device=(visible_gpus() or ("none",))[0])


@pytest.fixture
def run_script(out_dir, verdicts):
    """``run_script(script, *args, record=..., timeout=...)``: run a GPU script of this folder or of bench/ (path
    relative to this folder; one that stays runnable by hand) with $OUT = the test's folder, its output shown as it
    comes (``-s``), and take the rows of the JSON record it writes there (``record``: a name or a glob) into the
    test's table."""
    def run(script: str, *args: str, record: str, timeout: float):
        cmd = [sys.executable, str(Path(__file__).parent / script), *args]
        ran = run_command(cmd, timeout=timeout, env={"OUT": str(out_dir)}, log=out_dir / f"{Path(script).stem}.log",
                          echo=True)
        path = next(iter(sorted(out_dir.glob(record))), out_dir / record)
        if path.exists():
            verdicts.extend(json.loads(path.read_text())["rows"])
            verdicts.figures["record"] = str(path)
        if not ran.ok and not verdicts.failed:
            verdicts.row(" ".join([script, *args]), False, ran.why(3))
        return ran

    return run


@pytest.fixture
def run_check(out_dir, verdicts):
    """``run_check(func, *args, timeout=..., echo=False)``: call ``func`` of a module here in a fresh process; the
    {"rows", "figures"} it returns become the test's (a FAIL row says how the process failed)."""
    def run(func, *args, timeout: float, echo: bool = False):
        ran = run_function(func, *args, timeout=timeout, log=out_dir / f"{func.__name__}.log", echo=echo)
        if ran.value is None:
            verdicts.row(f"{func.__name__} in a fresh process", False, ran.why(3))
        else:
            verdicts.extend(ran.value["rows"])
            verdicts.figures.update(ran.value["figures"])
        return ran

    return run


@pytest.fixture
def fidelity(out_dir, gpu_count, verdicts):
    """``fidelity(check, *args)``: run a fidelity check (gpu/fidelity.py: its SAVE and LOAD children spread over
    the visible GPUs) and take its rows."""
    def run(check, *args):
        report(verdicts, check(Runner(out_dir, gpu_count), *args))

    return run
