"""Live TP switches under load, for test_elastic.py (one process: the controller, the load, the verdicts).

``backend="local"`` runs the controller on a thread and the engines as plain processes; ``"ray"`` starts a local
Ray instance on the machine's GPUs (Ray staged with ``scripts/stage_ray.py``, docs/STAGING.md) and runs the same
switches with the controller as a Ray actor and each engine in a worker actor bound to a placement group of
``tp`` GPUs (the production path). The deployment serves the qwen3-8b-shaped preset with reduced layers on two
GPUs; under steady load of streaming and non-streaming greedy requests it switches TP1 -> TP2 (captures and saves
the TP2 archive), TP2 -> TP1 (restores), TP1 -> TP2 (restores). Reported: switch time by phase, failed requests
(must be 0), incomplete responses (must be 0), and whether every response equals the TP1 greedy reference
(informational: bf16 TP2 may differ in a token).
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from types import SimpleNamespace

import aiohttp
from openai_client import openai_request

from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment
from foundry_sglang.graphs.settings import FoundryConfig
from foundry_sglang.proc import disable_nvls
from gpu.verdicts import Verdicts

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


def start_ray(gpus: int) -> tuple[str, bool | None, str]:
    """Start a local Ray instance on this machine's GPUs; its row (name, verdict, detail): INFO, or FAIL with the
    reason."""
    # Set before ray.init: the raylet, and every actor and engine process below it, inherit this environment
    # (the engines' own environment turns multicast off again, foundry_sglang.proc.disable_nvls).
    disable_nvls()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as err:
        return ("Ray backend", False, f"needs Ray ({err}); stage it with scripts/stage_ray.py "
                "(docs/STAGING.md) and source /tmp/foundry_ray/env.sh")
    ray.init(include_dashboard=False, log_to_driver=False)
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < gpus:
        ray.shutdown()
        return ("Ray backend", False, f"Ray sees {have} GPU(s), the check needs {gpus}")
    return (f"Ray {ray.__version__} backend", None, f"{have} GPUs in the local cluster")


def run_switches(out: str, backend: str = "local", standby: int = 0,
                 model: str = "builtin:qwen3-8b?num_hidden_layers=4", concurrency: int = 8, max_tokens: int = 32,
                 engine_args: list[str] = ()) -> dict:
    """Serve ``model`` on two GPUs and switch its layout three times under load; rows and figures. ``out``: engine
    logs and archives; ``standby``: warm standby engines kept on free GPUs (local backend; docs/ELASTIC.md);
    ``concurrency``: clients during the switches; ``max_tokens``: tokens per request."""
    args = SimpleNamespace(out=out, model=model, concurrency=concurrency, max_tokens=max_tokens,
                           engine_arg=list(engine_args), backend=backend, standby=standby)
    verdicts = Verdicts(f"elastic TP switch ({backend}, standby {standby})")
    row = verdicts.row
    os.makedirs(args.out, exist_ok=True)
    archives = os.path.join(args.out, "archives")
    jobs = []
    if args.backend == "ray":
        if row(*start_ray(2)).verdict == "FAIL":
            return {"rows": verdicts.rows, "figures": {}}
    cfg = DeploymentConfig(model=args.model, slots=2, tp=1, replicas=1, device="cuda", gpu_ids=[0, 1],
                           backend=args.backend, port=0, foundry=FoundryConfig.resolve("auto", archives),
                           log_dir=os.path.join(args.out, "logs"), extra_args=list(args.engine_arg),
                           start_timeout=420, queue_timeout=420, standby=args.standby)
    dep = ElasticDeployment(cfg)
    t0 = time.monotonic()
    url = dep.start()
    row("initial TP1 start (capture + save)", None, f"{time.monotonic() - t0:.1f}s")

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
            row(f"switch TP{3 - tp}->TP{tp} ({note}) {job['strategy']}", ok, f"{job['total_s']:.2f}s")
            row("  phases (s)", None, phases)
            time.sleep(2.0)
    finally:
        load.stop.set()
        load.thread.join(600)
        status = dep.status()
        dep.stop()
        if args.backend == "ray":
            import ray
            ray.shutdown()
    figures = {"backend": args.backend, "jobs": jobs, "status": status, "ok": load.ok,
               "failures": load.failures[:50], "mismatch": load.mismatch}
    served_by = status.get("backend")
    row("workers ran on backend", served_by == args.backend, str(served_by))
    saved = sorted(os.path.relpath(os.path.join(d, n), archives) for d, _, ns in os.walk(archives) for n in ns)
    row("archives written", bool(saved), ", ".join(saved[:6]) or "none")
    restore_faster = len(jobs) == 3 and jobs[2]["phases_s"].get("wait_healthy", 1e9) < \
        jobs[0]["phases_s"].get("wait_healthy", 0)
    row("TP2 start restored faster than captured", True if restore_faster else "WARN", str(restore_faster))
    row("complete responses under load", load.ok > 0, str(load.ok))
    row("failed requests", not load.failures, str(len(load.failures)))
    row("responses != TP1 greedy reference", None, str(load.mismatch))
    return {"rows": verdicts.rows, "figures": figures}

