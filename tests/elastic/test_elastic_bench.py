"""bench/elastic_standby_switch.py --plot: the latency-over-time picture from a results JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "elastic_standby_switch.py"


def test_plot_draws_latency_over_time_with_the_switches_marked(tmp_path):
    pytest.importorskip("matplotlib")
    requests = [{"t": i * 0.1, "latency_s": 0.05 + (0.4 if 10 < i < 20 else 0), "ok": i != 15,
                 "replica": f"{1 + (i > 12)}:4000{i % 2}", "stream": i % 2 == 0, "sampled": False}
                for i in range(40)]
    switch = {"name": "TP1->TP2", "strategy": "gap", "state": "succeeded", "t_submit": 1.0, "t_done": 2.2,
              "total_s": 1.2, "phases_s": {"plan": 0.0, "drain_old": 0.1, "stop_old": 0.5, "start_new": 0.0,
                                            "wait_healthy": 0.6, "switch": 0.0}}
    doc = {"meta": {"date": "2026-12-07T00:00:00Z", "commit": "abc1234", "device": "cpu", "model": "builtin:tiny"},
           "modes": [{"mode": "standby=1", "switches": [switch], "requests": requests,
                      "counts": {"ok": 39, "failed": 1, "greedy_mismatched": 0}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, str(BENCH), "--plot", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "run.png"
    assert out.stdout.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failures_are_told_apart_by_what_was_done_on_purpose():
    """A failed request running on the replica killed on purpose, or sent or running while the controller was
    killed and came back, is counted apart; any other failure is not."""
    sys.path.insert(0, str(BENCH.parents[1]))
    from bench.elastic_standby_switch import counts

    switches = [{"name": "replica killed", "strategy": "repair", "replica": "1:4000", "t_submit": 5.0, "t_done": 9.0},
                {"name": "controller restarted", "strategy": "recover", "t_submit": 20.0, "t_done": 30.0}]
    requests = [{"t": 4.0, "latency_s": 1.5, "ok": False, "replica": "1:4000"},    # on the killed replica
                {"t": 19.5, "latency_s": 1.0, "ok": False, "replica": "1:4001"},   # running at the kill
                {"t": 25.0, "latency_s": 0.0, "ok": False, "replica": None},       # refused meanwhile
                {"t": 31.0, "latency_s": 0.1, "ok": False, "replica": None},       # after it: counts
                {"t": 12.0, "latency_s": 0.1, "ok": True, "replica": "1:4001", "greedy_equal": False}]
    c = counts(requests, switches)
    assert c == {"ok": 1, "failed": 4, "failed_on_killed_replica": 1, "failed_during_controller_restart": 2,
                 "greedy_mismatched": 1}
