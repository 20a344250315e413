"""The GPU checks (tests/gpu/check_*.py) as pytest tests, for the device: ``python3 -m pytest -m gpu -s``.

Each test runs one check script in a fresh process from the repo root, with the repo prepended to PYTHONPATH
(the scripts and the processes they start import foundry_core/foundry_sglang from it). The script's output is
streamed (shown live with ``-s``) and its verdict table stays the last thing it prints. A test passes when the
script exits 0 and no row of its output carries a FAIL verdict. Details land in ``$OUT/<check>/`` when $OUT is
set (the device), else in pytest's temporary directory. Without a CUDA GPU the tests are skipped (conftest.py);
a check that needs two GPUs or SGLang is skipped, with the reason, where they are missing.

    python3 -m pytest -m gpu -s                        # every check this machine can run
    python3 -m pytest -m gpu -s -k "core or binaries"  # a subset (one device call is limited to 10 minutes)

Per-check time limit: the table's, or FOUNDRY_GPU_CHECK_TIMEOUT seconds; on time-out the script's whole
process group is killed (servers and rank processes included).
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

#: A row whose verdict is FAIL in any of the scripts' table styles: "FAIL  | name", "[FAIL] name",
#: "| name | FAIL |", "name   FAIL    info". FAILED (a word inside a detail) does not match.
FAIL_ROW = re.compile(r"(?:^|[\s|\[])FAIL(?:$|[\s|\]])")


@dataclass(frozen=True)
class Check:
    """One GPU check script and how the test runs it."""

    name: str  # test id
    script: str  # file in tests/gpu
    args: tuple[str, ...] = ()  # "{out}" becomes the check's output directory
    gpus: int = 1  # GPUs it needs
    needs_sglang: bool = False
    timeout_s: int = 600
    marks: tuple = field(default=())


CHECKS = [
    Check("core", "check_core.py", ("--out", "{out}")),
    Check("binaries", "check_binaries.py", ("--out", "{out}")),
    Check("engine", "check_engine.py"),
    Check("engine_tp2", "check_engine.py", ("--tp", "2"), gpus=2),
    Check("launch", "check_launch.py", ("--out", "{out}")),
    Check("comm_patch_1gpu", "check_comm_patch.py", ("--gpus", "1")),
    Check("comm_patch_2gpu", "check_comm_patch.py", ("--gpus", "2"), gpus=2),
    Check("elastic", "check_elastic.py", ("--out", "{out}")),
    Check("elastic_sglang", "check_elastic.py", ("--out", "{out}", "--worker", "sglang"), needs_sglang=True),
    Check("fidelity", "check_fidelity.py", ("--out", "{out}")),
    Check("capture_pools", "check_capture_pools.py", ("--out", "{out}")),
    Check("sglang_server", "check_sglang_server.py", ("--out", "{out}"), needs_sglang=True),
]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fail_rows(output: str) -> list[str]:
    """Lines of a check's output that report a FAIL verdict."""
    return [line for line in output.splitlines() if FAIL_ROW.search(line)]


def run_check(check: Check, out: Path, timeout_s: float) -> tuple[int | None, str]:
    """Run the script; stream its output to our stdout as it comes; return (exit code or None on time-out,
    the whole output)."""
    env = dict(os.environ, OUT=str(out), PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    args = [a.replace("{out}", str(out)) for a in check.args]
    cmd = [sys.executable, str(HERE / check.script), *args]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script's servers and rank processes too
        proc.wait()
        rc = None
    reader.join(10)
    return rc, "".join(lines)


@pytest.mark.gpu
@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
def test_gpu_check(check: Check, tmp_path):
    if check.gpus > 1 and gpu_count() < check.gpus:
        pytest.skip(f"{check.script} {' '.join(check.args)} needs {check.gpus} GPUs")
    if check.needs_sglang and importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not importable (put the pure-Python sglang wheel and its light deps on PYTHONPATH)")
    out = Path(os.environ["OUT"]) / check.name if os.environ.get("OUT") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    timeout_s = float(os.environ.get("FOUNDRY_GPU_CHECK_TIMEOUT", check.timeout_s))
    rc, output = run_check(check, out, timeout_s)
    tail = "\n".join(output.splitlines()[-40:])
    assert rc is not None, f"{check.script} ran past {timeout_s:.0f} s and was killed; last lines:\n{tail}"
    failed = fail_rows(output)
    assert rc == 0 and not failed, (f"{check.script} exit {rc}; FAIL rows:\n" + "\n".join(failed)
                                    + f"\nlast lines:\n{tail}")


# -- on every machine (CI included): the scripts stay runnable ---------------------------------------------------


@pytest.mark.parametrize("script", sorted({c.script for c in CHECKS}))
def test_check_script_imports_and_explains_its_flags(script, monkeypatch, capsys):
    """Each script imports what it names at top level (no GPU needed for that) and answers --help, as it would
    when run from the repo root with the repo on PYTHONPATH: a rename in foundry_core/foundry_sglang that would
    break a device run, or a help string argparse cannot format, fails here, on CPU."""
    monkeypatch.syspath_prepend(str(REPO))
    spec = importlib.util.spec_from_file_location(f"gpu_{Path(script).stem}", HERE / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_fail_rows_reads_every_table_style():
    output = "\n".join([
        "[PASS] startup: 36 graphs",
        "[FAIL] graph == eager (bs 64): 3/64",
        "FAIL  | LOAD (process B)                                 | rc=1",
        "PASS  | SAVE (process A)                                 | capture 1.2s",
        "| restored replays == saved replays (bitwise) | FAIL | 5 sizes |",
        "failed requests                          FAIL  3",
        "TP=2 vs TP=1                         WARN    11/16 greedy sequences identical",
        "info  | note                                             | CUDA_ERROR_FAILED_X, FAILED over",
    ])
    assert [line.split()[0] for line in fail_rows(output)] == ["[FAIL]", "FAIL", "|", "failed"]


def test_run_check_streams_output_and_kills_the_whole_group_on_time_out(tmp_path, capsys):
    script = tmp_path / "slow_check.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('PASS  | started', flush=True)\n"
        "time.sleep(60)\n")
    rc, output = run_check(Check("slow", str(script)), tmp_path, timeout_s=3)
    assert rc is None and "PASS  | started" in output
    assert "PASS  | started" in capsys.readouterr().out
    child = int(pid_file.read_text())
    for _ in range(50):  # the killed grandchild disappears once reaped by init
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} survived the time-out")


def test_run_check_passes_the_repo_and_out_dir(tmp_path):
    script = tmp_path / "env_check.py"
    script.write_text("import os, foundry_core\nprint(os.environ['OUT'], foundry_core.__file__)\n")
    rc, output = run_check(Check("env", str(script)), tmp_path, timeout_s=120)
    out_dir, core_file = output.split()[-2:]
    assert rc == 0 and out_dir == str(tmp_path) and core_file == str(REPO / "foundry_core" / "__init__.py")
