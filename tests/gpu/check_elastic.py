"""GPU check of live TP switching (run by the lead on nvidia-h200-x2; one command, verdict table last).

    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_elastic.py --out "$OUT" [--backend ray]

``--backend local`` (default) runs the controller on a thread and the engines as plain processes. The GPU image
has no Ray (its cp312 wheel is 79 MB, over the 64 MiB a call may carry): stage it first with
``scripts/stage_ray.py`` (docs/STAGING.md), then ``--backend ray`` starts a local Ray instance on the machine's
GPUs and runs the same switches with the controller as a Ray actor and each engine in a worker actor bound to
a placement group of ``tp`` GPUs (the production path). The deployment serves the
qwen3-8b-shaped preset with reduced layers on two GPUs; under steady load of streaming and non-streaming greedy
requests it switches TP1 -> TP2 (captures and saves the TP2 archive), TP2 -> TP1 (restores), TP1 -> TP2
(restores). Reported: switch time by phase, failed requests (must be 0), incomplete responses (must be 0),
and whether every response equals the TP1 greedy reference (informational: bf16 TP2 may differ in a token).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for --help without PYTHONPATH

import aiohttp

from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment
from foundry_sglang.graphs.settings import FoundryConfig
from foundry_sglang.proc import disable_nvls
from tests.openai_client import openai_request

PROMPTS = [f"Request {i}: explain the history of the printing press." for i in range(8)]


async def one(session, url, i, stream, max_tokens):
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return await openai_request(session, url, body)


class Load:
    def __init__(self, url, reference, concurrency, max_tokens):
        self.url, self.reference, self.concurrency, self.max_tokens = url, reference, concurrency, max_tokens
        self.ok = self.mismatch = 0
        self.failures = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.run()), daemon=True)

    async def run(self):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
            async def worker(w):
                i = w
                while not self.stop.is_set():
                    stream = i % 2 == 0
                    text, err = await one(s, self.url, i, stream, self.max_tokens)
                    if err:
                        self.failures.append(err)
                    else:
                        self.ok += 1
                        self.mismatch += text != self.reference[(i % len(PROMPTS), stream)]
                    i += self.concurrency
            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))


def start_ray(gpus: int):
    """Start a local Ray instance on this machine's GPUs; returns a verdict row, or None (reason printed)."""
    # Set before ray.init: the raylet, and every actor and engine process below it, inherit this environment
    # (the engines' own environment turns multicast off again, foundry_sglang.proc.disable_nvls).
    disable_nvls()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as err:
        print(f"check_elastic: --backend ray needs Ray ({err}); stage it with scripts/stage_ray.py "
              "(docs/STAGING.md) and source /tmp/foundry_ray/env.sh", file=sys.stderr)
        return None
    ray.init(include_dashboard=False, log_to_driver=False)
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < gpus:
        ray.shutdown()
        print(f"check_elastic: Ray sees {have} GPU(s), the check needs {gpus}", file=sys.stderr)
        return None
    return (f"Ray {ray.__version__} backend", f"{have} GPUs in the local cluster", "info")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/elastic-check"),
                    help="directory for engine logs, archives and results.json (default $OUT)")
    ap.add_argument("--model", default="builtin:qwen3-8b?num_hidden_layers=4",
                    help="model served (default: the qwen3-8b preset with 4 layers)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients during the switches")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra engine flag (repeatable)")
    ap.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="where workers run: local processes (default) or Ray actors on placement groups (Ray "
                         "must be importable: scripts/stage_ray.py, docs/STAGING.md)")
    ap.add_argument("--standby", type=int, default=0,
                    help="warm standby engines kept on free GPUs (local backend; docs/ELASTIC.md; default 0)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(args.out, exist_ok=True)
    archives = os.path.join(args.out, "archives")
    rows, jobs = [], []
    if args.backend == "ray":
        ray_row = start_ray(2)
        if ray_row is None:
            return 2
        rows.append(ray_row)
    cfg = DeploymentConfig(model=args.model, slots=2, tp=1, replicas=1, device="cuda", gpu_ids=[0, 1],
                           backend=args.backend, port=0, foundry=FoundryConfig.resolve("auto", archives),
                           log_dir=os.path.join(args.out, "logs"), extra_args=list(args.engine_arg),
                           start_timeout=420, queue_timeout=420, standby=args.standby)
    dep = ElasticDeployment(cfg)
    t0 = time.monotonic()
    url = dep.start()
    rows.append(("initial TP1 start (capture + save)", f"{time.monotonic() - t0:.1f}s", "info"))

    async def reference():
        async with aiohttp.ClientSession() as s:
            out = {}
            for i in range(len(PROMPTS)):
                for stream in (False, True):
                    text, err = await one(s, url, i, stream, args.max_tokens)
                    if err:
                        raise SystemExit(f"reference request failed: {err}")
                    out[(i, stream)] = text
            return out
    ref = asyncio.run(reference())
    load = Load(url, ref, args.concurrency, args.max_tokens)
    load.thread.start()
    try:
        for tp, note in ((2, "capture+save"), (1, "restore"), (2, "restore")):
            job = dep.reconfigure(tp=tp)
            jobs.append(job)
            phases = " ".join(f"{k}={v:.2f}" for k, v in job["phases_s"].items())
            ok = job["state"] == "succeeded"
            rows.append((f"switch TP{3 - tp}->TP{tp} ({note}) {job['strategy']}", f"{job['total_s']:.2f}s",
                         "PASS" if ok else "FAIL"))
            rows.append(("  phases (s)", phases, "info"))
            time.sleep(2.0)
    finally:
        load.stop.set()
        load.thread.join(600)
        status = dep.status()
        dep.stop()
        if args.backend == "ray":
            import ray
            ray.shutdown()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"backend": args.backend, "jobs": jobs, "status": status, "ok": load.ok,
                   "failures": load.failures[:50], "mismatch": load.mismatch}, f, indent=1)
    served_by = status.get("backend")
    rows.append(("workers ran on backend", str(served_by), "PASS" if served_by == args.backend else "FAIL"))
    saved = sorted(os.path.relpath(os.path.join(d, n), archives) for d, _, ns in os.walk(archives) for n in ns)
    rows.append(("archives written", ", ".join(saved[:6]) or "none", "PASS" if saved else "FAIL"))
    restore_faster = len(jobs) == 3 and jobs[2]["phases_s"].get("wait_healthy", 1e9) < \
        jobs[0]["phases_s"].get("wait_healthy", 0)
    rows.append(("TP2 start restored faster than captured", str(restore_faster), "PASS" if restore_faster else "WARN"))
    rows.append(("complete responses under load", str(load.ok), "PASS" if load.ok > 0 else "FAIL"))
    rows.append(("failed requests", str(len(load.failures)), "PASS" if not load.failures else "FAIL"))
    rows.append(("responses != TP1 greedy reference", str(load.mismatch), "info"))
    print("\nVERDICT elastic TP switch on GPU")
    w = max(len(r[0]) for r in rows)
    for name, value, verdict in rows:
        print(f"{name:<{w}}  {verdict:<5} {value}")
    return 0 if all(v != "FAIL" for _, _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
