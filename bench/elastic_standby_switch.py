"""Switch phases with and without standby engines (real engine processes, local-process backend).

For each mode (``--standby 0`` and ``--standby 1``) one deployment on 2 slots runs TP1 -> TP2 (gap) -> TP1 ->
replicas 1 -> 2 (scale), waiting before each switch until the standby pool is warm, and checks a greedy
completion after each. Prints a table of the phases per switch and mode, and writes JSON.

    PYTHONPATH=$PWD python3 bench/elastic_standby_switch.py [--out bench/results/elastic_standby_cpu.json]
    PYTHONPATH=$PWD python3 bench/elastic_standby_switch.py --device cuda --gpu-ids 0,1 [--out ...]

``--device cpu`` (default): gloo, ``builtin:tiny``. ``--device cuda``: the qwen3-8b shape with 4 layers on the
GPUs of ``--gpu-ids`` (``0,0``: both slots on one GPU), graphs through Foundry archives in ``auto`` mode in one
directory both modes share: the standby=0 run captures and saves each layout once, so both runs' switches
restore their graphs and differ only in the standby engines.
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

MODELS = {"cpu": "builtin:tiny", "cuda": "builtin:qwen3-8b?num_hidden_layers=4"}
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


def run_mode(standby: int, log_dir: str, device: str = "cpu", gpu_ids=None, archives=None) -> list:
    extra = {}
    if device == "cuda":
        from foundry_sglang.graphs.settings import FoundryConfig

        extra = dict(gpu_ids=gpu_ids, foundry=FoundryConfig.resolve("auto", archives), start_timeout=420,
                     queue_timeout=420)
    cfg = DeploymentConfig(model=MODELS[device], slots=2, tp=1, replicas=1, device=device, backend="local",
                           port=0, standby=standby, log_dir=log_dir, **extra)
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
            same = complete(dep.url) == reference
            assert same or device == "cuda", "outputs changed across the switch"  # bf16 TP=2 may flip a token
            rows.append({"mode": f"standby={standby}", "switch": name, "strategy": job["strategy"],
                         "total_s": job["total_s"], "phases_s": job["phases_s"], "same_output": same,
                         "standby": dep.status()["standby"]})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--log-dir", default="/tmp/foundry-standby-bench", help="engine logs (and, on GPUs, archives)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="engines on CPU (gloo) or GPUs")
    ap.add_argument("--gpu-ids", default="0,1", help="with --device cuda: the GPU of each of the 2 slots")
    args = ap.parse_args()
    gpu_ids = [int(x) for x in args.gpu_ids.split(",")]
    if args.device == "cuda":
        from tools.needs_gpu import exit_without_gpu

        exit_without_gpu("this benchmark", max(gpu_ids) + 1)
    archives = os.path.join(args.log_dir, "archives")
    rows = [r for standby in (0, 1) for r in run_mode(standby, os.path.join(args.log_dir, f"standby{standby}"),
                                                      args.device, gpu_ids, archives)]
    print(f"{'mode':<11} {'switch':<14} {'strategy':<8} {'total':>7}  phases")
    for r in rows:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
        print(f"{r['mode']:<11} {r['switch']:<14} {r['strategy']:<8} {r['total_s']:>6.2f}s  {phases}")
    if args.out:
        commit = os.environ.get("FOUNDRY_COMMIT") or subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        device = "cpu (gloo)"
        if args.device == "cuda":
            import torch

            device = f"{torch.cuda.get_device_name(0)}, slots on GPUs {gpu_ids}"
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
                "host": platform.node(), "cpus": os.cpu_count(), "device": device, "model": MODELS[args.device]}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
