"""The GPU tests' harness on CPU (tests/gpu: fresh.py, verdicts.py, records.py, the skips in conftest.py), so
that a GPU run does not spend its minutes on a harness bug."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from gpu.conftest import _skip_reason
from gpu.fresh import REPO, run_command, run_function
from gpu.records import write_record
from gpu.verdicts import Verdicts


def test_run_function_returns_what_the_function_returned_run_from_the_repo():
    ran = run_function(os.getcwd, timeout=120)
    assert ran.ok and ran.value == str(REPO)


def test_fresh_processes_import_the_repo_and_the_gpu_package(tmp_path):
    ran = run_command([sys.executable, "-c", "import foundry_core, gpu; print(foundry_core.__file__, gpu.__file__)"],
                      timeout=120, log=tmp_path / "log")
    core, gpu = ran.output.split()[-2:]
    assert ran.ok and core == str(REPO / "foundry_core/__init__.py") and gpu == str(REPO / "tests/gpu/__init__.py")
    assert "rc=0" in (tmp_path / "log").read_text()


def test_a_failed_function_reports_its_last_line():
    ran = run_function(json.loads, "not json", timeout=120)
    assert ran.value is None and ran.rc == 1 and ran.why().startswith("rc=1: json.decoder.JSONDecodeError")


def test_time_out_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    ran = run_command([sys.executable, "-c", script], timeout=5)
    assert ran.rc is None and "started" in ran.output and ran.why().startswith("killed after")
    child = int(pid_file.read_text())
    for _ in range(50):  # the killed grandchild disappears once reaped by init
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {child} survived the time-out")


def test_verdicts_map_outcomes_and_fail_on_fail_rows(capsys):
    v = Verdicts("t")
    v.row("a", True, "1")
    v.row("b", None, "2")
    v.row("c", "WARN", "near-ties")
    assert "PASS | a" in capsys.readouterr().out
    v.extend([["SKIP", "d", "no second GPU"]])
    assert [r.verdict for r in v.rows] == ["PASS", "INFO", "INFO", "SKIP"]
    assert v.rows[2].detail == "warning: near-ties" and "SKIP | d" not in capsys.readouterr().out
    v.assert_passed()
    v.row("e", False, "3/4 equal")
    with pytest.raises(AssertionError, match="FAIL | e"):
        v.assert_passed()
    with pytest.raises(ValueError):
        v.row("f", "ok", "")
    with pytest.raises(AssertionError, match="no rows"):
        Verdicts("empty").assert_passed()


def test_record_has_date_device_commit_rows_and_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_COMMIT", "abc123")
    v = Verdicts("t", echo=False)
    v.row("a", True, "x")
    v.figures["capture_s"] = 1.5
    doc = json.loads(write_record(tmp_path / "sub" / "t.json", v, "NVIDIA H200").read_text())
    assert doc["device"] == "NVIDIA H200" and doc["commit"] == "abc123" and doc["date"].endswith("Z")
    assert doc["rows"] == [["PASS", "a", "x"]] and doc["figures"] == {"capture_s": 1.5}


class _Item:
    def __init__(self, *markers):
        self.markers = markers

    def get_closest_marker(self, name):
        return name if name in self.markers else None


def test_skip_reasons():
    assert _skip_reason(_Item("gpu"), ()) == "needs a CUDA GPU"
    assert _skip_reason(_Item("gpu", "two_gpu"), ("H200",)) == "needs 2 CUDA GPUs (1 visible)"
    assert _skip_reason(_Item("gpu", "two_gpu"), ("H200", "H200")) is None
    assert _skip_reason(_Item("gpu"), ("H200",)) is None


def test_graph_facts_read_a_real_tp2_load_log():
    """What the SGLang check reads from a server log: here the LOAD of a real TP=2 server (both ranks), plus the
    line restore.build_all logs once the background has instantiated every graph."""
    from gpu.sglang_servers import graph_facts

    from foundry_core.restore import ALL_READY_MESSAGE

    text = (REPO / "bench/results/logs-2026-12-07-h100/dense-tp2-foundry-auto-2.log").read_text(errors="replace")
    facts = graph_facts(text)
    assert (facts["foundry_mode"], facts["restored"], facts["live"], facts["ranks_reported"]) == ("load", 12, 0, 2)
    assert facts["ranks_agree"] and facts["restore_s"] in (0.09, 0.1) and facts["tracebacks"] == 0
    assert facts["bs"] == [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64] and "all_graphs_ready_s" not in facts

    line = ALL_READY_MESSAGE % (12, 0.412, 0.05, 0.3, 8000)
    assert graph_facts(text + "\n[2026-12-07 12:03:08.950 TP0] " + line)["all_graphs_ready_s"] == 0.412
    from foundry_sglang.graphs.router import FIRST_INSTALL_MESSAGE

    line = FIRST_INSTALL_MESSAGE % ("decode_bs64", 0.4871)
    assert graph_facts(text + "\n[2026-12-07 12:03:08.950 TP0] " + line)["first_install_s"] == 0.487
