"""Live switches under client load, with and without standby workers: per-request latency and per-switch phases.

For each mode (``--standby 0`` and ``--standby 1``) one deployment on 2 slots serves a steady client load
(streaming and non-streaming, greedy and sampled) while it switches TP1 -> TP2 (gap) -> TP1 -> replicas 1 -> 2
(scale); then one replica is SIGKILLed outside a switch and replaced. Before each step it waits until the
standby pool is warm. Every request is recorded (start time, latency, ok/failed, the replica that answered,
whether a greedy answer equals the first layout's) and every switch with its phases (stop old, start new, wait
healthy, route). Prints a table, writes JSON, and ``--plot JSON`` draws latency over time with the switches
marked (PNG next to the JSON).

    PYTHONPATH=$PWD python3 bench/elastic_standby_switch.py --out bench/results/elastic_switch-DATE-cpu.json
    PYTHONPATH=$PWD python3 bench/elastic_standby_switch.py --device cuda --gpu-ids 0,1 --out ...
    PYTHONPATH=$PWD python3 bench/elastic_standby_switch.py --backend ray --out bench/results/elastic_ray-DATE-cpu.json
    python3 bench/elastic_standby_switch.py --plot bench/results/elastic_switch-DATE-cpu.json

``--device cpu`` (default): gloo, ``builtin:tiny``. ``--device cuda``: the qwen3-8b shape with 4 layers on the
GPUs of ``--gpu-ids`` (``0,0``: both slots on one GPU), graphs through Foundry archives in ``auto`` mode in one
directory both modes share, so both runs' switches restore their graphs and differ only in the standby workers.
``--backend ray`` runs the controller, its replicas and its standbys on a local Ray cluster (started here)
instead of as local processes; on GPUs, ``--gpu-ids 0,0`` there means two half-GPU slots.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for --help without PYTHONPATH

from tests.openai_client import openai_request  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {"cpu": "builtin:tiny", "cuda": "builtin:qwen3-8b?num_hidden_layers=4"}
SWITCHES = [("TP1->TP2", {"tp": 2, "replicas": 1}), ("TP2->TP1", {"tp": 1, "replicas": 1}),
            ("replicas 1->2", {"tp": 1, "replicas": 2})]
PROMPTS = [f"request {i}: tell me about the sea" for i in range(4)]
#: Controller phases as the plot groups them.
PHASE_GROUPS = {"drain_old": "stop old", "stop_old": "stop old", "shrink_old": "stop old", "start_new": "start new",
                "wait_healthy": "wait healthy", "switch": "route", "rollback": "rollback"}
GROUP_COLORS = {"stop old": "#d62728", "start new": "#ff7f0e", "wait healthy": "#1f77b4", "route": "#2ca02c",
                "rollback": "#7f7f7f"}


class Load:
    """Client threads sending requests until stopped; every request is recorded."""

    def __init__(self, url: str, t0: float, clients: int, max_tokens: int = 8, expected=None):
        """``expected(replica, prompt, stream)``: the greedy answer that replica must give (None: not judged);
        default: the first answer seen for that prompt."""
        self.url, self.t0, self.clients, self.max_tokens = url, t0, clients, max_tokens
        self.records: list = []
        self.reference: dict = {}
        self.expected = expected
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def body(self, i: int) -> dict:
        stream, sampled = i % 2 == 0, i % 3 == 2
        return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": self.max_tokens, "stream": stream,
                "temperature": 0.8 if sampled else 0, **({"seed": i} if sampled else {})}

    async def one(self, session, i: int) -> dict:
        import aiohttp

        body = self.body(i)
        start = time.monotonic()
        rec = {"t": round(start - self.t0, 3), "stream": body["stream"], "sampled": body["temperature"] > 0}
        got: dict = {}
        try:
            text, error = await openai_request(session, self.url, body, headers=got)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            text, error = None, type(exc).__name__
            await asyncio.sleep(0.2)  # a refused connection answers at once: do not spin while nothing listens
        replica = got.get("X-Foundry-Replica")
        rec.update(latency_s=round(time.monotonic() - start, 4), ok=error is None, replica=replica)
        if error:
            rec["error"] = error
        elif not rec["sampled"]:
            key = (body["prompt"], body["stream"])
            want = self.expected(replica, *key) if self.expected else self.reference.setdefault(key, text)
            if want is not None:
                rec["greedy_equal"] = want == text
        return rec

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
            async def client(c: int) -> None:
                i = c
                while not self._stop.is_set():
                    self.records.append(await self.one(s, i))
                    i += self.clients
            await asyncio.gather(*(client(c) for c in range(self.clients)))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(600)


def wait_standby_ready(dep, timeout: float = 300.0) -> float:
    """Wait until every free slot holds a warm standby (none when the serving layout takes all slots, unless
    standbys may wait on serving slots: then the whole target); RuntimeError once the pool is disabled or after
    ``timeout`` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = dep.status()
        if st["standby"].get("disabled"):
            raise RuntimeError(f"standby pool disabled: {st['standby']['disabled']}")
        layout = st["layout"]        # between switches only the active generation holds slots
        used = max(layout["tp"], layout["ep"]) * layout["replicas"]
        room = st["slots"] if st["standby"].get("coreside") else st["slots"] - used
        if st["standby"]["ready"] >= min(st["standby"]["target"], room):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"standby pool not ready within {timeout:.0f}s: {dep.status()['standby']}")


def kill_one_replica(dep, t0: float, timeout: float = 600.0) -> dict:
    """SIGKILL a serving replica outside a switch and wait until the controller has replaced it (RuntimeError
    after ``timeout`` seconds)."""
    st = dep.status()
    gen = st["generations"][0]
    victim = gen["replicas"][-1]["pid"]
    name = f"{gen['id']}:{gen['replicas'][-1]['url'].rsplit(':', 1)[1]}"   # as X-Foundry-Replica names it
    restarts = st["restarts"]
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while True:
        st = dep.status()
        pids = [r["pid"] for g in st["generations"] for r in g["replicas"]]
        if st["restarts"] > restarts and st["state"] == "serving" and victim not in pids:
            break
        if time.monotonic() - t_kill > timeout:
            raise RuntimeError(f"replica pid {victim} not replaced within {timeout:.0f}s: {st['state']}")
        time.sleep(0.05)
    done = time.monotonic()
    return {"name": "replica killed", "strategy": "repair", "state": "replaced", "t_submit": round(t_kill - t0, 3),
            "t_done": round(done - t0, 3), "total_s": round(done - t_kill, 3), "phases_s": {}, "replica": name}


def counts(requests: list, switches: list) -> dict:
    """ok / failed / greedy answers unlike the first layout's; ``failed_on_killed_replica``: failed requests that
    were running on the replica killed on purpose (a sampled stream cannot be resumed elsewhere);
    ``failed_during_controller_restart``: failed requests sent or running while the controller, which holds the
    router, was killed and came back (a ``recover`` entry of ``switches``)."""
    kills = [(s["replica"], s["t_submit"]) for s in switches if s.get("replica")]
    outages = [(s["t_submit"], s["t_done"]) for s in switches if s.get("strategy") == "recover"]
    failed = [r for r in requests if not r["ok"]]
    killed = [r for r in failed if any(r["replica"] == name and r["t"] <= t for name, t in kills)]
    restart = [r for r in failed if r not in killed and any(
        r["t"] <= end and r["t"] + r.get("latency_s", 0) >= begin for begin, end in outages)]
    return {"ok": len(requests) - len(failed), "failed": len(failed), "failed_on_killed_replica": len(killed),
            "failed_during_controller_restart": len(restart),
            "greedy_mismatched": sum(r.get("greedy_equal") is False for r in requests)}


def run_mode(standby: int, log_dir: str, device: str, gpu_ids, archives, clients: int,
             backend: str = "local") -> dict:
    from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment

    extra: dict = {}
    if device == "cuda":
        from foundry_sglang.graphs.settings import FoundryConfig

        extra = dict(foundry=FoundryConfig.resolve("auto", archives), start_timeout=420, queue_timeout=420)
        if backend == "local":
            extra["gpu_ids"] = gpu_ids
        elif len(set(gpu_ids)) < len(gpu_ids):       # Ray: slots are shares of the GPUs it was given
            extra["slots_per_gpu"] = 2
    cfg = DeploymentConfig(model=MODELS[device], slots=2, tp=1, replicas=1, device=device, backend=backend,
                           port=0, standby=standby, log_dir=log_dir, **extra)
    switches = []
    with ElasticDeployment(cfg) as dep:
        t0 = time.monotonic()
        with Load(dep.url, t0, clients) as load:
            for name, target in SWITCHES:
                wait_standby_ready(dep) if standby else time.sleep(2.0)
                t_submit = time.monotonic()
                job = dep.reconfigure(**target)
                switches.append({"name": name, "strategy": job["strategy"], "state": job["state"],
                                 "t_submit": round(t_submit - t0, 3), "t_done": round(time.monotonic() - t0, 3),
                                 "total_s": job["total_s"], "phases_s": job["phases_s"],
                                 "from_standby": any(r.get("from_standby") for g in dep.status()["generations"]
                                                     for r in g["replicas"])})
            wait_standby_ready(dep) if standby else time.sleep(2.0)
            switches.append(kill_one_replica(dep, t0))
            time.sleep(3.0)
        status = dep.status()
    recs = load.records
    return {"mode": f"standby={standby}", "backend": backend, "switches": switches, "requests": recs,
            "counts": counts(recs, switches),
            "standby": status["standby"]}


def plot(path: str) -> str:
    """Draw the latency of every request over time, one panel per mode, the switches' phases shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise SystemExit("elastic_standby_switch: --plot needs matplotlib (pip install matplotlib)") from None
    with open(path) as f:
        doc = json.load(f)
    modes = doc["modes"]
    top = max([r["latency_s"] for m in modes for r in m["requests"]] or [1.0])
    fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.8 * len(modes)), squeeze=False, sharey=True)
    for ax, mode in zip(axes[:, 0], modes):
        recs = mode["requests"]
        replicas = sorted({r["replica"] for r in recs if r["replica"]}, key=lambda x: [int(p) for p in x.split(":")])
        for i, rep in enumerate(replicas):
            pts = [r for r in recs if r["ok"] and r["replica"] == rep]
            ax.scatter([r["t"] for r in pts], [r["latency_s"] for r in pts], s=6, color=f"C{i % 10}",
                       label=f"replica {rep}")
        bad = [r for r in recs if not r["ok"]]
        ax.scatter([r["t"] for r in bad], [r["latency_s"] for r in bad], s=30, marker="x", color="red",
                   label=f"failed ({len(bad)})")
        for sw in mode["switches"]:
            t = sw["t_submit"]
            for phase, secs in sw["phases_s"].items():
                group = PHASE_GROUPS.get(phase)
                if group and secs > 0:
                    ax.axvspan(t, t + secs, color=GROUP_COLORS[group], alpha=0.25, lw=0)
                t += secs
            ax.axvline(sw["t_submit"], color="black", lw=0.8, ls="--")
            ax.text(sw["t_submit"], top * 1.25, f"{sw['name']} {sw['total_s']:.2f}s ", fontsize=7, rotation=90,
                    va="top", ha="right")
        handles, _ = ax.get_legend_handles_labels()
        handles += [Patch(color=color, alpha=0.25, label=group) for group, color in GROUP_COLORS.items()]
        c = mode["counts"]
        killed = c.get("failed_on_killed_replica", 0)
        ax.set_title(f"{mode['mode']}: {c['ok']} ok, {c['failed']} failed"
                     f"{f' ({killed} on the replica killed on purpose)' if killed else ''}, "
                     f"{c['greedy_mismatched']} greedy answers unlike the first layout's", fontsize=10)
        ax.set_ylabel("request latency (s)")
        ax.set_ylim(0, top * 1.27)
        ax.legend(handles=handles, fontsize=7, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel("time since the load started (s)")
    meta = doc["meta"]
    fig.suptitle(f"Live switches under load ({meta.get('backend', 'local')} backend): {meta['model']} on "
                 f"{meta['device']} "
                 f"({meta['date'][:10]}, commit {meta['commit']})", fontsize=11)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the JSON here (and the plot next to it)")
    ap.add_argument("--plot", metavar="JSON", help="draw the PNG of a results JSON (next to it) and exit")
    ap.add_argument("--log-dir", default="/tmp/foundry-standby-bench", help="engine logs (and, on GPUs, archives)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="engines on CPU (gloo) or GPUs")
    ap.add_argument("--gpu-ids", default="0,1", help="with --device cuda: the GPU of each of the 2 slots")
    ap.add_argument("--clients", type=int, default=3, help="concurrent clients during the switches (default 3)")
    ap.add_argument("--standby", default="0,1", help="standby modes to run, comma-separated (default 0,1)")
    ap.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="controller backend: local processes (default) or a local Ray cluster started here "
                         "(on the GPUs of --gpu-ids with --device cuda)")
    args = ap.parse_args()
    if args.plot:
        print(plot(args.plot))
        return 0
    gpu_ids = [int(x) for x in args.gpu_ids.split(",")]
    if args.device == "cuda":
        from tools.needs_gpu import exit_without_gpu

        exit_without_gpu("this benchmark", max(gpu_ids) + 1)
    archives = os.path.join(args.log_dir, "archives")
    if args.backend == "ray":
        import ray

        from foundry_sglang.proc import disable_nvls

        disable_nvls()                          # the raylet and everything below it inherit this environment
        if args.device == "cuda":
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in sorted(set(gpu_ids)))
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(4, os.cpu_count() or 1))
    modes = [run_mode(int(n), os.path.join(args.log_dir, f"standby{n}"), args.device, gpu_ids, archives,
                      args.clients, args.backend) for n in args.standby.split(",")]
    print(f"{'mode':<11} {'switch':<15} {'strategy':<8} {'total':>7}  phases")
    for m in modes:
        for s in m["switches"]:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in s["phases_s"].items())
            print(f"{m['mode']:<11} {s['name']:<15} {s['strategy']:<8} {s['total_s']:>6.2f}s  {phases}")
        print(f"{m['mode']:<11} requests: {m['counts']}")
    if args.out:
        commit = os.environ.get("FOUNDRY_COMMIT") or subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        device = "cpu"
        if args.device == "cuda":
            import torch

            device = f"{torch.cuda.get_device_name(0)}, slots on GPUs {gpu_ids}"
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
                "host": platform.node(), "cpus": os.cpu_count(), "device": device, "model": MODELS[args.device],
                "clients": args.clients, "backend": args.backend}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "modes": modes}, f, indent=1)
        print(plot(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
