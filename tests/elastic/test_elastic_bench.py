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
