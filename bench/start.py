"""Whole-server start benchmark of the built-in engine: eager vs live capture vs Foundry LOAD, in one run.

    python bench/start.py [--model builtin:qwen3-8b?vocab_size=320] [--starts 2] [--out DIR]

Every start is a fresh ``python -m foundry_sglang.engine`` process. We poll ``/health`` every 10 ms, send one
streamed greedy completion as soon as it answers, and split the start into phases from the server's
``startup timeline`` log line (wall-clock ends of: import, engine set-up, CUDA init, graph backend, weights, KV
cache, graphs, HTTP listening). A LOAD start also reports when the early load (Foundry's archive checks and kernel
images, started before the server imports torch) had finished, in seconds since launch, and how long ``restore()``
then waited for it. Modes:
  eager    --disable-cuda-graph
  capture  live CUDA-graph capture of the decode batch sizes (PyTorch, SGLang-style)
  load     Foundry LOAD of the archive that one ``save`` start (not timed against the others) wrote first, as a
           user gets it (the early load is on by default since 2026-12-07)
  load_late  the same with the early load off (FOUNDRY_EARLY_LOAD=0); run when asked for in --modes
  load_early the same with FOUNDRY_EARLY_LOAD=1 set explicitly (results of 2026-11-30 and 2026-12-07 name the
             start without an early load "load" and the one with it "load_early")
Starts run interleaved (eager, capture, load, eager, ...) after the save start, which also warms the page cache.
Then one more process restores the archive and times decode steps at bs 1/8/64/256 eagerly and through the
restored graphs (TPOT). Target: the median LOAD time to healthy <= the median eager one + 0.1 s (moonshot: <=
eager); the table gives medians, the spread (fastest-slowest) and the best. Writes start.json and start.png
to --out and prints the table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TPOT_BS = [1, 8, 64, 256]
TARGET_S = 0.1
MODES = ("eager", "capture", "load")
LOAD_VARIANTS = ("load_late", "load_early")  # LOAD with the early load forced off / on
ALL_MODES = MODES + LOAD_VARIANTS
MODE_FLAGS = {"eager": ["--disable-cuda-graph"], "capture": ["--foundry-mode", "off"],
              "save": ["--foundry-mode", "save"], "load": ["--foundry-mode", "load"],
              "load_late": ["--foundry-mode", "load"], "load_early": ["--foundry-mode", "load"],
              # another graph set (another archive key), as a second TP/EP layout would have
              "save_second_layout": ["--foundry-mode", "save", "--cuda-graph-max-bs", "128"]}
MODE_ENV = {"load_late": {"FOUNDRY_EARLY_LOAD": "0"}, "load_early": {"FOUNDRY_EARLY_LOAD": "1"}}
TIMELINE = re.compile(r"startup timeline: (\{.*\})")
#: Timeline marks of work beside the start-up sequence (the early load): reported, but they end no phase.
BACKGROUND_MARKS = ("early_load_started", "early_load_ready")
PRELOAD_WAIT = re.compile(r"preloader wait ([0-9.]+)s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_flags(a) -> list[str]:
    """Flags shared by every start (and by the TPOT process, so its archive key is the same)."""
    return ["--model", a.model, "--device", a.device, "--dtype", "bfloat16", "--num-kv-pages", str(a.kv_pages),
            "--max-running-requests", "256", "--foundry-archive", str(a.archive_dir)]


def first_token(url: str, timeout: float = 120.0) -> tuple[float, float]:
    """Stream one greedy 8-token completion; returns (seconds to the first token, seconds to the last)."""
    body = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft = None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data: {") and ttft is None:
                ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else float("nan")), time.perf_counter() - t0


def start_once(mode: str, a, log_path: Path) -> dict:
    """One server start: time to healthy, first token, phases. Never raises; errors land in the result."""
    port = free_port()
    cmd = [sys.executable, "-m", "foundry_sglang.engine", *server_flags(a), *MODE_FLAGS[mode], "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONUNBUFFERED="1", **MODE_ENV.get(mode, {}))
    url = f"http://127.0.0.1:{port}"
    out: dict = {"mode": mode, "ok": False}
    with open(log_path, "w") as log:
        t_launch = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            while proc.poll() is None and time.time() - t_launch < a.start_timeout:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as r:
                        if r.status == 200:
                            out["healthy_s"] = time.time() - t_launch
                            break
                except OSError:
                    time.sleep(0.01)
            if "healthy_s" not in out:
                out["error"] = f"not healthy after {time.time() - t_launch:.0f} s (rc={proc.poll()})"
                return out
            ttft, total = first_token(url)
            out.update(first_request_ttft_s=ttft, first_request_total_s=total,
                       first_token_s=out["healthy_s"] + ttft, ok=True)
        except Exception as e:  # one failed start must not end the benchmark
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = log_path.read_text(errors="replace")
    out["phases_s"] = phases(text, t_launch, out.get("healthy_s"))
    out.update(background(text, t_launch))
    return out


def phases(log_text: str, t_launch: float, healthy_s) -> dict:
    """Consecutive phase durations from the server's timeline; each named by the mark that ends it."""
    m = TIMELINE.search(log_text)
    if not m:
        return {}
    marks = sorted(((k, v) for k, v in json.loads(m.group(1)).items() if k not in BACKGROUND_MARKS),
                   key=lambda kv: kv[1])
    names = {"imported": "import", "runner": "engine_setup", "cuda_init": "cuda_init",
             "distributed_and_graph_backend": "graph_backend_open", "weights": "weights", "kv_cache": "kv_cache",
             "graphs": "graphs", "engine": "engine_finish", "listening": "http_listen"}
    out, prev = {}, t_launch
    for name, t in marks:
        out[names.get(name, name)] = t - prev
        prev = t
    if healthy_s is not None:
        out["health_poll"] = t_launch + healthy_s - prev
    return out


def background(log_text: str, t_launch: float) -> dict:
    """The early load's end in seconds since launch, whether the graph backend adopted it, and how long restore()
    waited for the kernels (when logged)."""
    out = {}
    if "foundry: using the early load of" in log_text:
        out["early_load_adopted"] = True
    elif "foundry: not using the early load of" in log_text:
        out["early_load_adopted"] = False
    m = TIMELINE.search(log_text)
    if m:
        marks = json.loads(m.group(1))
        if "early_load_ready" in marks:
            out["early_load_ready_s"] = marks["early_load_ready"] - t_launch
    wait = PRELOAD_WAIT.search(log_text)
    if wait:
        out["restore_waited_s"] = float(wait.group(1))
    return out


def tpot_child(a, result: str) -> None:
    """Restore the archive in-process and time decode steps eagerly and through the restored graphs."""
    import torch
    from cold_start import decode_inputs, fill_kv, median

    from foundry_sglang.builtin.backend import make_graph_backend
    from foundry_sglang.engine.model_runner import ModelRunner
    from foundry_sglang.engine.server import build_arg_parser, engine_args_from

    args = engine_args_from(build_arg_parser().parse_args(server_flags(a) + MODE_FLAGS["load"]))
    runner = ModelRunner(args, rank=0, graph_backend_factory=make_graph_backend)
    backend = runner.graph_backend
    out = {"fallback": getattr(backend, "fallback_reason", None), "tpot_ms": {}}
    if out["fallback"] is None:
        backend.session.wait_restored()
    with torch.inference_mode():
        fill_kv(runner)
        for bs in TPOT_BS:
            if bs not in runner.graph_bs:
                continue
            decode_inputs(runner, bs, seed=2)
            eager_logits = runner._decode_forward_static(bs).clone()
            graph_logits = backend.replay(bs).clone()
            times = {}
            for name, step in (("eager", lambda: runner._decode_forward_static(bs)),
                               ("restored", lambda: backend.replay(bs))):
                for _ in range(3):
                    step()
                samples = []
                for _ in range(a.tpot_iters):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    step()
                    e1.record()
                    e1.synchronize()
                    samples.append(e0.elapsed_time(e1))
                times[name] = median(samples)
            out["tpot_ms"][str(bs)] = {
                "eager": times["eager"], "restored": times["restored"], "speedup": times["eager"] / times["restored"],
                "max_abs_diff": float((eager_logits - graph_logits).abs().max()),
                "argmax_equal": bool((eager_logits.argmax(-1) == graph_logits.argmax(-1)).all())}
    Path(result).write_text(json.dumps(out))
    os._exit(0)


def store_report(archive_dir: Path) -> dict:
    """Bytes on disk of the archives and their shared kernel-image store, and each archive's shared/own split."""
    from foundry_core.archive import Archive
    from foundry_core.store import STORE_DIRNAME, store_usage

    archives = {}
    for p in sorted(archive_dir.glob("*.foundry")):
        with Archive.open(p) as archive:
            archives[p.name] = dict(store_usage(archive), file_bytes=p.stat().st_size,
                                    graphs=len(archive.manifest.graphs))
    store = archive_dir / STORE_DIRNAME
    files = list(store.glob("*.img")) if store.is_dir() else []
    return {"archives": archives, "store_images": len(files), "store_bytes": sum(f.stat().st_size for f in files)}


def run_tpot(a, log_path: Path) -> dict:
    result = Path(a.work) / "tpot.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--tpot-child", str(result), *argv_of(a)]
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=a.start_timeout).returncode
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if rc != 0 or not result.exists():
        return {"error": f"rc={rc}: " + log_path.read_text(errors="replace")[-1500:]}
    return json.loads(result.read_text())


def argv_of(a) -> list[str]:
    return ["--model", a.model, "--device", a.device, "--kv-pages", str(a.kv_pages), "--work", str(a.work),
            "--tpot-iters", str(a.tpot_iters)]


def best(starts: list[dict], key: str):
    vals = [s[key] for s in starts if s.get("ok")]
    return min(vals) if vals else None


def median_of(starts: list[dict], key: str):
    """The median of the successful starts' ``key`` (the mean of the middle two for an even count)."""
    vals = sorted(s[key] for s in starts if s.get("ok") and s.get(key) is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def spread_of(starts: list[dict], key: str):
    vals = [s[key] for s in starts if s.get("ok") and s.get(key) is not None]
    return [min(vals), max(vals)] if vals else None


def summarize(runs: dict) -> dict:
    summary = {}
    for mode, starts in runs.items():
        ok = [s for s in starts if s.get("ok")]
        # the phases shown are those of the start whose time to healthy is the median (the lower middle one)
        typical = sorted(ok, key=lambda s: s["healthy_s"])[(len(ok) - 1) // 2] if ok else {}
        summary[mode] = {"healthy_s": median_of(starts, "healthy_s"), "healthy_best_s": best(starts, "healthy_s"),
                         "healthy_spread_s": spread_of(starts, "healthy_s"),
                         "healthy_all_s": [s["healthy_s"] for s in ok],
                         "first_token_s": median_of(starts, "first_token_s"),
                         "first_request_ttft_s": typical.get("first_request_ttft_s"),
                         "early_load_ready_s": typical.get("early_load_ready_s"),
                         "early_load_adopted": typical.get("early_load_adopted"),
                         "restore_waited_s": typical.get("restore_waited_s"),
                         "phases_s": typical.get("phases_s", {}), "starts_ok": f"{len(ok)}/{len(starts)}"}
    eager, load = summary.get("eager", {}), summary.get("load", {})
    verdict = {"target": f"median LOAD healthy <= median eager healthy + {TARGET_S} s"}
    if eager.get("healthy_s") is not None and load.get("healthy_s") is not None:
        excess = load["healthy_s"] - eager["healthy_s"]
        verdict.update(load_minus_eager_s=excess, met=excess <= TARGET_S, moonshot_met=excess <= 0.0,
                       best_load_minus_best_eager_s=load["healthy_best_s"] - eager["healthy_best_s"])
        diffs = {p: load["phases_s"].get(p, 0.0) - eager["phases_s"].get(p, 0.0)
                 for p in set(load["phases_s"]) | set(eager["phases_s"])}
        verdict["phase_load_minus_eager_s"] = dict(sorted(diffs.items(), key=lambda kv: -kv[1]))
        if not verdict["met"]:
            verdict["blocking_phase"] = max(diffs, key=diffs.get) if diffs else "unknown"
    for other in LOAD_VARIANTS:
        if eager.get("healthy_s") is not None and summary.get(other, {}).get("healthy_s") is not None:
            verdict[f"{other}_minus_eager_s"] = summary[other]["healthy_s"] - eager["healthy_s"]
    summary["verdict"] = verdict
    return summary


def plot(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    s = doc["summary"]
    modes = [m for m in ALL_MODES if s.get(m, {}).get("phases_s")]
    order = ["import", "engine_setup", "cuda_init", "graph_backend_open", "weights", "kv_cache", "graphs",
             "engine_finish", "http_listen", "health_poll"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("tab20")
    for i, mode in enumerate(modes):
        left = 0.0
        ph = s[mode]["phases_s"]
        for j, name in enumerate(order):
            v = ph.get(name, 0.0)
            ax.barh(i, v, left=left, color=cmap(j), label=name if i == 0 else None)
            left += v
        ttft = s[mode].get("first_request_ttft_s") or 0.0
        ax.barh(i, ttft, left=left, color="black", label="first request (TTFT)" if i == 0 else None)
        ax.text(left + ttft + 0.05, i, f"healthy {s[mode]['healthy_s']:.2f}s, 1st token {left + ttft:.2f}s",
                va="center", fontsize=8)
    ax.set_yticks(range(len(modes)), modes)
    ax.set_xlabel("seconds since process launch (the median start of each mode)")
    ax.set_title(f"Server start, built-in engine, {doc['model']}")
    ax.legend(fontsize=7, loc="lower right")
    tp = doc.get("tpot", {}).get("tpot_ms", {})
    if tp:
        bss = list(tp)
        xs = range(len(bss))
        bx.bar([x - 0.2 for x in xs], [tp[b]["eager"] for b in bss], 0.4, label="eager", color="#888888")
        bx.bar([x + 0.2 for x in xs], [tp[b]["restored"] for b in bss], 0.4, label="restored graphs",
               color="#d62728")
        bx.set_xticks(list(xs), [f"bs {b}" for b in bss])
        bx.set_ylabel("decode step (ms)")
        bx.set_title("TPOT: eager vs Foundry-restored graphs")
        bx.legend(fontsize=8)
    fig.suptitle(f"{doc['device']} · commit {doc['commit'][:10]} · {doc['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(doc: dict) -> None:
    s = doc["summary"]
    print(f"\n=== server start, {doc['model']}, {doc['device']}, commit {doc['commit'][:10]}, {doc['date']} ===")
    print("| mode | healthy, median (s) | spread | best | first token (s) | TTFT after healthy (s) | import "
          "| CUDA init | weights | KV | graphs | starts ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in ALL_MODES:
        m = s.get(mode)
        if not m:
            continue
        ph = m["phases_s"]

        def f(v):
            return "n/a" if v is None else f"{v:.2f}"
        sp = m.get("healthy_spread_s") or [None, None]
        print(f"| {mode} | {f(m['healthy_s'])} | {f(sp[0])}-{f(sp[1])} | {f(m.get('healthy_best_s'))} | "
              f"{f(m['first_token_s'])} | {f(m['first_request_ttft_s'])} | "
              f"{f(ph.get('import'))} | {f(ph.get('cuda_init'))} | {f(ph.get('weights'))} | {f(ph.get('kv_cache'))} | "
              f"{f(ph.get('graphs'))} | {m['starts_ok']} |")
    tp = doc.get("tpot", {})
    if tp.get("tpot_ms"):
        print("\n| bs | eager TPOT (ms) | restored graphs (ms) | speed-up | argmax equal |")
        print("|---|---|---|---|---|")
        for bs, v in tp["tpot_ms"].items():
            print(f"| {bs} | {v['eager']:.2f} | {v['restored']:.2f} | {v['speedup']:.2f}x | {v['argmax_equal']} |")
    elif tp.get("error"):
        print(f"TPOT: FAILED {tp['error'][-300:]}")
    st = doc.get("image_store") or {}
    if st.get("archives"):
        print(f"\nimage store: {st['store_images']} images, {st['store_bytes'] / 1e6:.1f} MB, shared by:")
        print("| archive | graphs | file (MB) | images shared with others (MB) | own images (MB) |")
        print("|---|---|---|---|---|")
        for name, u in st["archives"].items():
            print(f"| {name[:48]} | {u['graphs']} | {u['file_bytes'] / 1e6:.1f} | {u['shared_bytes'] / 1e6:.1f} | "
                  f"{u['own_bytes'] / 1e6:.1f} |")
    for mode in ("load",) + LOAD_VARIANTS:
        load = s.get(mode) or {}
        if load.get("restore_waited_s") is None:
            continue
        ready, adopted = load.get("early_load_ready_s"), load.get("early_load_adopted")
        early = "no early load" if ready is None else f"early load ready {ready:.2f} s after launch" + (
            "" if adopted else " but NOT adopted (see the start's log)")
        print(f"\n{mode}: {early}; restore() waited {load['restore_waited_s']:.3f} s for the kernels")
    v = s["verdict"]
    for other in LOAD_VARIANTS:
        if f"{other}_minus_eager_s" in v:
            print(f"\n{other} - eager = {v[other + '_minus_eager_s']:+.2f} s (medians)")
    if "met" in v:
        print(f"\nverdict: {v['target']}: {'MET' if v['met'] else 'NOT MET'} (LOAD - eager = "
              f"{v['load_minus_eager_s']:+.2f} s, medians)" + ("" if v["met"] else f"; largest extra phase in LOAD: "
              f"{v['blocking_phase']} ({v['phase_load_minus_eager_s'][v['blocking_phase']]:+.2f} s)"))
    else:
        print(f"\nverdict: {v['target']}: NOT MEASURED")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:qwen3-8b?vocab_size=320",
                    help="model or builtin preset (default: the Qwen3-8B shape, byte-level vocabulary)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only for a smoke test (eager)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma list of eager, capture, load, load_late, load_early")
    ap.add_argument("--starts", type=int, default=5, help="timed starts per mode (medians, spread and best reported)")
    ap.add_argument("--kv-pages", type=int, default=8192, help="KV-cache pages of 16 tokens (same for every mode)")
    ap.add_argument("--tpot-iters", type=int, default=50, help="timed decode steps per batch size")
    ap.add_argument("--no-tpot", action="store_true", help="skip the eager-vs-restored decode timing")
    ap.add_argument("--second-layout", action="store_true",
                    help="also save a second archive (other graph sizes) beside the first and report the image store")
    ap.add_argument("--start-timeout", type=float, default=240.0, help="seconds a start may take")
    ap.add_argument("--work", default=os.environ.get("FOUNDRY_BENCH_WORK", "/tmp/foundry-start"),
                    help="scratch directory (archives, logs of the starts)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="directory for start.json/.png")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG from a results JSON (next to it) and exit")
    ap.add_argument("--tpot-child", metavar="RESULT", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work = Path(a.work)
    a.archive_dir = a.work / "archives"
    if a.tpot_child:
        tpot_child(a, a.tpot_child)
        return
    if a.plot_only:
        src = Path(a.plot_only)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        return
    if a.device == "cuda":
        from tools.needs_gpu import exit_without_gpu

        exit_without_gpu()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    logs = a.work / "logs"
    logs.mkdir(exist_ok=True)
    modes = [m for m in a.modes.split(",") if m]
    runs: dict = {m: [] for m in modes}
    if any(m.startswith("load") for m in modes):
        import shutil

        shutil.rmtree(a.archive_dir, ignore_errors=True)
        runs["save"] = [start_once("save", a, logs / "save.log")]
        print(f"save: {json.dumps(runs['save'][0])}", flush=True)
    for i in range(a.starts):
        for mode in modes:
            r = start_once(mode, a, logs / f"{mode}-{i}.log")
            runs[mode].append(r)
            print(f"{mode} #{i}: {json.dumps(r)}", flush=True)
    tpot = {}
    if "load" in modes and not a.no_tpot and a.device == "cuda":
        tpot = run_tpot(a, logs / "tpot.log")
    store = {}
    if "load" in modes and a.second_layout:
        runs["save_second_layout"] = [start_once("save_second_layout", a, logs / "save2.log")]
        store = store_report(a.archive_dir)
    device = "cpu"
    if a.device == "cuda":
        import torch

        device = torch.cuda.get_device_name(0)
    commit = os.environ.get("FOUNDRY_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or "unknown"
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
           "commit": commit, "model": a.model, "kv_pages": a.kv_pages, "starts_per_mode": a.starts,
           "summary": summarize({m: runs[m] for m in modes}), "tpot": tpot, "image_store": store, "starts": runs}
    (out / "start.json").write_text(json.dumps(doc, indent=1))
    plot(doc, out / "start.png")
    print_table(doc)


if __name__ == "__main__":
    main()
