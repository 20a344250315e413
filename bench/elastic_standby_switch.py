"""Switch phases with and without standby engines, on CPU (gloo, real engine processes, ``builtin:tiny``).

For each mode (``--standby 0`` and ``--standby 1``) one local-backend deployment on 2 CPU slots runs
TP1 -> TP2 (gap) -> TP1 -> replicas 1 -> 2 (scale), waiting before each switch until the standby pool is warm,
and checks a greedy completion after each. Prints a table of the phases per switch and mode, and writes JSON.

    PYTHONPATH=$PWD python3 bench/elastic_standby_switch.py [--out bench/results/elastic_standby_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for --help without PYTHONPATH

from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWITCHES = [("TP1->TP2", {"tp": 2, "replicas": 1}), ("TP2->TP1", {"tp": 1, "replicas": 1}),
            ("replicas 1->2", {"tp": 1, "replicas": 2})]


def complete(url: str) -> str:
    body = json.dumps({"prompt": "hello", "max_tokens": 6, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["text"]


def wait_standby_ready(dep: ElasticDeployment, timeout: float = 120.0) -> float:
    """Wait until every free slot holds a warm standby (none when the serving layout takes all slots)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = dep.status()
        used = sum(len(r["slots"]) for g in st["generations"] for r in g["replicas"])
        if st["standby"]["ready"] >= min(st["standby"]["target"], st["slots"] - used):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"standby pool not ready within {timeout:.0f}s: {dep.status()['standby']}")


def run_mode(standby: int, log_dir: str) -> list:
    cfg = DeploymentConfig(model="builtin:tiny", slots=2, tp=1, replicas=1, device="cpu", backend="local",
                           port=0, standby=standby, log_dir=log_dir)
    rows = []
    with ElasticDeployment(cfg) as dep:
        reference = complete(dep.url)
        for name, target in SWITCHES:
            if standby:
                wait_standby_ready(dep)
            else:
                time.sleep(2.0)      # the same quiet time before each switch as with a standby warming up
            job = dep.reconfigure(**target)
            assert job["state"] == "succeeded", job
            assert complete(dep.url) == reference, "outputs changed across the switch"
            rows.append({"mode": f"standby={standby}", "switch": name, "strategy": job["strategy"],
                         "total_s": job["total_s"], "phases_s": job["phases_s"],
                         "standby": dep.status()["standby"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--log-dir", default="/tmp/foundry-standby-bench", help="engine logs")
    args = ap.parse_args()
    rows = run_mode(0, os.path.join(args.log_dir, "off")) + run_mode(1, os.path.join(args.log_dir, "on"))
    print(f"{'mode':<11} {'switch':<14} {'strategy':<8} {'total':>7}  phases")
    for r in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
        print(f"{r['mode']:<11} {r['switch']:<14} {r['strategy']:<8} {r['total_s']:>6.2f}s  {phases}")
    if args.out:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
                "host": platform.node(), "cpus": os.cpu_count(), "device": "cpu (gloo)", "model": "builtin:tiny"}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
