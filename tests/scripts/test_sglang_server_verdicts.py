"""The SGLang server check's verdicts on made-up results (tests/gpu/check_sglang_server.py runs on a GPU)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_check():
    sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location("check_sglang_server", ROOT / "tests/gpu/check_sglang_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(healthy, graphs, e2e, chose=None):
    return {"name": "x", "healthy_s": healthy, "decode_graph_phase_s": graphs, "chose": chose,
            "startup_time": {"scheduler_e2e": e2e, "load_weight": 0.1, "cuda_graph": {"decode": graphs}}}


def healthy_row(plain, save, load):
    rows = load_check().verdicts("dense", 8, {"plain": plain, "save": save, "load": load})
    [row] = [r for r in rows if "time to healthy" in r.name]
    return row


def test_one_slower_whole_start_is_noise_but_a_slower_scheduler_is_not():
    plain, save = start(60.5, 4.27, 13.2), start(67.0, 2.54, 11.4, "SAVE")
    # the LOAD server healthy 11 s later (imports), its graph phase and scheduler start faster: PASS
    assert healthy_row(plain, save, start(71.7, 0.69, 9.1, "LOAD")).verdict == "PASS"
    # Foundry moved 2 s into the scheduler's start outside the graph phase: FAIL
    assert healthy_row(plain, save, start(58.0, 0.69, 15.2, "LOAD")).verdict == "FAIL"
    # a graph phase no faster than live capture: FAIL
    assert healthy_row(plain, save, start(58.0, 4.5, 9.1, "LOAD")).verdict == "FAIL"
