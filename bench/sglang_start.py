"""Start benchmark of a real SGLang server: SGLang eager vs SGLang live capture vs Foundry LOAD, in one run.

    source /tmp/foundry_stage/env.sh                 # SGLang staged (docs/STAGING.md)
    python3 bench/sglang_start.py --models qwen3-8b --starts 5 [--layers N] [--max-bs N] [--out DIR]
    python3 bench/sglang_start.py --estimate --models qwen3-8b --starts 5     # seconds it will take (no GPU)
    python3 bench/sglang_start.py --merge A.json B.json [--out DIR]          # one record from split runs
    python3 bench/sglang_start.py --plot JSON                                 # redraw the PNG next to JSON

Models (configs only, ``--load-format dummy``, requests as token ids; tests/gpu/sglang_servers.py): qwen3-8b
(Qwen3-8B's shapes, 36 layers) and qwen3-30b-a3b (Qwen3-30B-A3B's, 48 layers, 128 experts); ``--layers`` cuts both.
Per model, one server at a time on GPU 0, every server with the same fixed KV pool (``--kv-tokens``):
  save     ``python -m foundry_sglang.launch --foundry-mode save``: writes the archive; reported apart (it also
           warms the caches every later start shares)
  eager    ``python -m sglang.launch_server --disable-cuda-graph``
  capture  ``python -m sglang.launch_server``: SGLang captures its decode graphs live
  load     ``python -m foundry_sglang.launch --foundry-mode load`` on the save's archive
  load_auto  (only when named in ``--modes``) the same with ``--foundry-mode auto``: what auto costs a start that
           restores (every scheduler process records kernel images from its first line, since a SAVE may follow)
  load_late  (only when named) LOAD with ``FOUNDRY_EARLY_LOAD=0``: Triton's per-process cache key is computed at
           SGLang's first Triton launch in the graph phase, not on a thread while the model loads
then ``--starts`` rounds of the modes (interleaved). Each start: time to healthy (``/health`` every
20 ms; with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 it answers once SGLang is up, without the probe generation
that waits >= 1 s), the latency of one request (1 new token) sent as soon as it is healthy, SGLang's
``/server_info`` start-up times, and in the first ``--tpot-starts`` starts of each mode the decode TPOT with 1, 8
and 64 concurrent streams.
SGLang's log (``SGLANG_LOG_MS=1``) splits each start into phases, each ending at a log line:
  imports          launch -> ``server_args=...`` (main process: interpreter, imports, arguments, plugins)
  tokenizer_manager  n/a: built in the main process beside the scheduler start, with no log line of its own
  scheduler_spawn  -> ``Init torch distributed begin.`` (scheduler process spawned, its imports)
  distributed      -> ``Load weight begin.`` (process groups; Foundry opens its archive here)
  weights          -> ``Load weight end.``
  kv_pool          -> ``Memory pool end.``
  attention        -> ``Capture target decode CUDA graph begin.`` (attention backends)
  graphs           -> ``Capture target decode CUDA graph end.`` (live capture, or Foundry's restore)
  scheduler_rest   -> ``Engine startup timings`` (rest of the scheduler, its ready message to the main process)
  warmup           -> ``The server is fired up`` (HTTP server; SGLang's warm-up request is skipped here)
  health           -> the first ``/health`` 200
A phase whose line is missing is n/a and its time counts in the next phase (eager: attention and graphs).
Targets (verdict rows): LOAD's graph phase <= 0.3 s (median); LOAD's time to healthy <= eager's + 0.3 s
(medians), with the phases that make up any difference. Writes sglang_start-<date>-<device>.json (date,
device, commit, every start) to --out after every start, then the PNG (phases of each mode's median start as
stacked bars) and the tables; server logs go to --logs. ``--budget`` stops before a round that would not finish
in time. Without a GPU it prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # gpu.sglang_servers, gpu.verdicts
sys.path.insert(0, str(ROOT))  # tools.needs_gpu

from gpu.records import commit as git_commit  # noqa: E402
from gpu.sglang_servers import (  # noqa: E402
    MODELS,
    SERVER_FLAGS,
    generate,
    graph_facts,
    prompts,
    server_info,
    start_server,
    startup_fields,
    stream_marks,
    write_model,
)
from gpu.verdicts import FAIL, INFO, SKIP, Verdicts  # noqa: E402

#: Benchmark models: the server config (sglang_servers.MODELS) and the full depth.
BENCH_MODELS = {"qwen3-8b": ("dense", 36), "qwen3-30b-a3b": ("a3b", 48)}
MODES = ("eager", "capture", "load")  # the default run
ALL_MODES = MODES + ("load_auto", "load_late")
FOUNDRY_MODE = {"save": "save", "load": "load", "load_auto": "auto", "load_late": "load"}  # eager, capture: plain
MODE_ENV = {"load_late": {"FOUNDRY_EARLY_LOAD": "0"}}  # LOAD without its early work (Triton's key on a thread)
#: (phase, the log text that ends it), in start-up order; None: no log line marks it.
PHASE_MARKS = (
    ("imports", "server_args=ServerArgs("),
    ("tokenizer_manager", None),
    ("scheduler_spawn", "Init torch distributed begin."),
    ("distributed", "Load weight begin."),
    ("weights", "Load weight end."),
    ("kv_pool", "Memory pool end."),
    ("attention", "Capture target decode CUDA graph begin."),
    ("graphs", "Capture target decode CUDA graph end."),
    ("scheduler_rest", "Engine startup timings (s):"),
    ("warmup", "The server is fired up and ready to roll!"),
)
PHASES = tuple(p for p, _ in PHASE_MARKS) + ("health",)
LOG_STAMP = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)[^\]]*\] (.*)")
TPOT_BS = (1, 8, 64)
GRAPH_TARGET_S = 0.3  # LOAD's graph phase
HEALTHY_TARGET_S = 0.3  # LOAD's time to healthy over eager's
#: Rough seconds on an H200 (2026-11-30, sglang_server-*.json: plain SGLang healthy in 42-49 s with 8-16 layers,
#: SGLang's own scheduler 3-7 s of it; live decode capture 3.8 s / 16 dense layers, 5.8 s / 8 MoE layers; a SAVE
#: 38 s / 16 dense, 10.8 s / 8 MoE layers), for --estimate and --budget before a mode has run once.
EST_FIXED_S = 45.0
EST_LIVE_PER_LAYER_S = {"dense": 0.25, "a3b": 0.7}
EST_SAVE_PER_LAYER_S = {"dense": 2.4, "a3b": 1.4}
EST_LOAD_S = 1.5
EST_AFTER_S = 6.0  # first request, /server_info, stop
EST_TPOT_S = 12.0


# -- pure parts (tests/scripts/test_sglang_start.py) -------------------------------------------------------------
def log_marks(text: str) -> dict[str, float]:
    """Wall-clock time (epoch seconds, local time as logged) of the first line with each phase's mark."""
    wanted = [(p, mark) for p, mark in PHASE_MARKS if mark]
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = LOG_STAMP.search(line)
        if not m:
            continue
        for phase, mark in wanted:
            if phase not in found and mark in m.group(2):
                found[phase] = stamp_seconds(m.group(1))
    return found


def stamp_seconds(stamp: str) -> float:
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in stamp else "%Y-%m-%d %H:%M:%S"
    return datetime.datetime.strptime(stamp, fmt).timestamp()


def phases(marks: dict[str, float], t_launch: float, healthy_s: float | None) -> dict:
    """Consecutive phase durations (s): each from the previous mark found (or the launch) to its own; None where
    its mark is missing (the time then counts in the next phase found)."""
    out, prev = {}, t_launch
    for phase, _ in PHASE_MARKS:
        t = marks.get(phase)
        out[phase] = None if t is None else t - prev
        prev = prev if t is None else t
    out["health"] = None if healthy_s is None else t_launch + healthy_s - prev
    return out


def stream_tpot_ms(marks: list[tuple[float, int]], skip: int = 2) -> float | None:
    """Milliseconds per token of one stream from its token ``skip + 1`` to its last: (time, tokens so far) marks."""
    start = next(((t, n) for t, n in marks if n > skip), None)
    if start is None or marks[-1][1] <= start[1]:
        return None
    return 1e3 * (marks[-1][0] - start[0]) / (marks[-1][1] - start[1])


def phase_diffs(a: dict, b: dict) -> dict:
    """``a - b`` per phase; a phase one side lacks is merged with the next one both have (names joined by +):
    an eager start's attention and graph time is in its scheduler_rest."""
    out, names, da, db = {}, [], 0.0, 0.0
    for p in PHASES:
        va, vb = a.get(p), b.get(p)
        if va is None and vb is None:
            continue
        names.append(p)
        da, db = da + (va or 0.0), db + (vb or 0.0)
        if va is not None and vb is not None:
            out["+".join(names)] = da - db
            names, da, db = [], 0.0, 0.0
    if names:
        out["+".join(names)] = da - db
    return out


def after_spawn(start: dict) -> float | None:
    """Seconds of a start from SGLang's 'Init torch distributed begin' to healthy: the part after the imports,
    which are the same code in every mode and vary by seconds from start to start on a busy host."""
    phases = start.get("phases_s") or {}
    if phases.get("scheduler_spawn") is None:
        return None
    return sum(v for p, v in phases.items() if v is not None and p not in ("imports", "scheduler_spawn"))


def spread(values) -> dict | None:
    """Median, min, max and count of the values that are not None."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def median_start(starts: list[dict]) -> dict | None:
    """The successful start with the (lower) median time to healthy: the one drawn as stacked phases."""
    ok = sorted((s for s in starts if s.get("ok")), key=lambda s: s["healthy_s"])
    return ok[(len(ok) - 1) // 2] if ok else None


def summarize_mode(starts: list[dict]) -> dict:
    ok = [s for s in starts if s.get("ok")]
    rep = median_start(starts)
    tpot = {str(bs): spread(s.get("tpot_ms", {}).get(str(bs)) for s in ok) for bs in TPOT_BS}
    return {"starts_ok": f"{len(ok)}/{len(starts)}",
            "healthy_s": spread(s["healthy_s"] for s in ok),
            "first_request_s": spread(s.get("first_request_s") for s in ok),
            "graph_phase_s": spread(s.get("graphs", {}).get("decode_graph_phase_s") for s in ok),
            "phases_s": {p: (lambda sp: sp and sp["median"])(spread(s["phases_s"].get(p) for s in ok))
                         for p in PHASES},
            "tpot_ms": {bs: v for bs, v in tpot.items() if v},
            "median_start": None if rep is None else {"round": rep.get("round"), "run": rep.get("run")}}


def summarize(entry: dict) -> dict:
    """Per mode (and the save starts): spreads of every figure and the median of every phase."""
    out = {mode: summarize_mode(entry["starts"].get(mode, [])) for mode in ALL_MODES if entry["starts"].get(mode)}
    if entry.get("save"):
        out["save"] = summarize_mode(entry["save"])
    return out


def verdicts(key: str, entry: dict, table: Verdicts) -> None:
    """The target rows of one model: LOAD's graph phase, LOAD vs eager time to healthy, every graph restored."""
    s = entry["summary"]
    eager, capture, load = s.get("eager", {}), s.get("capture", {}), s.get("load", {})

    def fmt(sp, unit="s", digits=2):
        if not sp:
            return "n/a"
        return (f"{sp['median']:.{digits}f} {unit} (min {sp['min']:.{digits}f}, max {sp['max']:.{digits}f}, "
                f"n={sp['n']})")

    failed = [f"{st.get('mode')} #{st.get('round')}: {st.get('error', '?')[:120]}"
              for starts in [entry.get("save", [])] + list(entry["starts"].values()) for st in starts
              if not st.get("ok")]
    table.row(f"{key}: every start served", not failed, "; ".join(failed) or "all starts healthy and answered")
    timed = [st for starts in entry["starts"].values() for st in starts if "tpot_ms" in st or "tpot_error" in st]
    if timed:
        bad = [f"{st['mode']} #{st.get('round')}: {st.get('tpot_error') or 'a batch size without TPOT'}"[:160]
               for st in timed if "tpot_error" in st or None in st["tpot_ms"].values()]
        table.row(f"{key}: decode TPOT measured", not bad, "; ".join(bad) or f"{len(timed)} starts, bs {TPOT_BS}")
    g = load.get("graph_phase_s")
    live = capture.get("graph_phase_s")
    loaded = [st.get("graphs", {}) for st in entry["starts"].get("load", []) if st.get("ok")]
    restore = spread(gr.get("restore_s") for gr in loaded)
    first = spread(gr.get("first_install_s") for gr in loaded)
    waits = [gr["engine_wait"] for gr in loaded if gr.get("engine_wait")]
    table.row(f"{key}: LOAD graph phase <= {GRAPH_TARGET_S} s (median)",
              SKIP if not g else g["median"] <= GRAPH_TARGET_S,
              f"LOAD {fmt(g)}, of which restore() {fmt(restore, digits=3)} and SGLang's preparation of the first "
              f"graph {fmt(first, digits=3)}" + (f" (SGLang was in: {waits[0]})" if waits else "")
              + f"; SGLang live capture {fmt(live)}")
    he, hl = eager.get("healthy_s"), load.get("healthy_s")
    if not he or not hl:
        table.row(f"{key}: LOAD healthy <= eager + {HEALTHY_TARGET_S} s (median)", SKIP, "eager or LOAD not measured")
    else:
        excess = hl["median"] - he["median"]
        diffs = phase_diffs(load["phases_s"], eager["phases_s"])
        top = sorted(((p, d) for p, d in diffs.items() if abs(d) >= 0.01), key=lambda pd: -pd[1])[:4]
        table.row(f"{key}: LOAD healthy <= eager + {HEALTHY_TARGET_S} s (median)", excess <= HEALTHY_TARGET_S,
                  f"eager {fmt(he)}, LOAD {fmt(hl)}: {excess:+.2f} s; live capture {fmt(capture.get('healthy_s'))}; "
                  "phase medians LOAD - eager: " + (", ".join(f"{p} {d:+.2f} s" for p, d in top) or "none"))
    after = {m: spread(after_spawn(st) for st in entry["starts"].get(m, []) if st.get("ok"))
             for m in ("eager", "capture", "load")}
    if after["eager"] and after["load"]:
        table.row(f"{key}: LOAD - eager after the scheduler's imports", INFO,
                  f"from 'Init torch distributed begin' to healthy: eager {fmt(after['eager'])}, LOAD "
                  f"{fmt(after['load'])} ({after['load']['median'] - after['eager']['median']:+.2f} s), live capture "
                  f"{fmt(after['capture'])}; before it every mode runs the same imports (launcher and scheduler)")
    loads = [st for m in ("load", "load_auto", "load_late") for st in entry["starts"].get(m, []) if st.get("ok")]
    if loads:
        bad = [f"#{st.get('round')}: restored {st['graphs'].get('restored')} of {len(st['graphs'].get('bs', []))}, "
               f"live {st['graphs'].get('live')}, {st['graphs'].get('fallback_lines')}" for st in loads
               if not (st["graphs"].get("bs") and st["graphs"].get("restored") == len(st["graphs"]["bs"])
                       and st["graphs"].get("live") == 0 and not st["graphs"].get("fallback_lines"))]
        table.row(f"{key}: every LOAD restored every decode graph", not bad,
                  "; ".join(bad) or f"{len(loads)} starts, {len(loads[0]['graphs']['bs'])} graphs each, none live")
    auto = s.get("load_auto")
    if auto and load:
        diffs = phase_diffs(auto["phases_s"], load["phases_s"])
        top = sorted(((p, d) for p, d in diffs.items() if abs(d) >= 0.01), key=lambda pd: -abs(pd[1]))[:3]
        table.row(f"{key}: --foundry-mode auto vs load on the same archive", INFO,
                  f"healthy {fmt(auto.get('healthy_s'))} vs {fmt(load.get('healthy_s'))}: "
                  f"{auto['healthy_s']['median'] - load['healthy_s']['median']:+.2f} s; phase medians auto - load: "
                  + (", ".join(f"{p} {d:+.2f} s" for p, d in top) or "none"))
    late = s.get("load_late")
    if late and load and late.get("healthy_s") and load.get("healthy_s"):   # both have a start that served
        def graphs(m):
            g = m["phases_s"].get("graphs")
            return "n/a" if g is None else f"{g:.2f} s"
        table.row(f"{key}: Triton's cache key on a thread (load) vs at the first launch (load_late)", INFO,
                  f"graph phase median {graphs(load)} vs {graphs(late)}; "
                  f"healthy {fmt(load['healthy_s'])} vs {fmt(late['healthy_s'])}: "
                  f"{load['healthy_s']['median'] - late['healthy_s']['median']:+.2f} s")
    for mode in ("save",) + ALL_MODES:
        m = s.get(mode)
        if m:
            tp = ", ".join(f"bs{bs} {v['median']:.2f} ms" for bs, v in m["tpot_ms"].items()) or "not measured"
            table.row(f"{key}: {mode}", INFO, f"healthy {fmt(m['healthy_s'])}; first request "
                      f"{fmt(m['first_request_s'], digits=3)}; TPOT {tp}; starts ok {m['starts_ok']}")


def build_rows(doc: dict) -> Verdicts:
    table = Verdicts("SGLang start", echo=False)
    for key, entry in doc["models"].items():
        entry["summary"] = summarize(entry)
        verdicts(key, entry, table)
    doc["rows"] = [list(r) for r in table.rows]
    return table


def merge_docs(docs: list[dict]) -> dict:
    """One record from runs split over several commands (same device): their starts side by side per model."""
    devices = {d["device"] for d in docs}
    if len(devices) > 1:
        raise ValueError(f"records of different devices: {sorted(devices)}")
    out = json.loads(json.dumps(docs[0]))
    for doc in docs[1:]:
        offset = len(out["runs"])
        out["runs"].extend(doc["runs"])
        for key, entry in doc["models"].items():
            mine = out["models"].setdefault(key, dict(entry, save=[], starts={}))
            for st in entry.get("save", []):
                mine["save"].append(dict(st, run=st.get("run", 0) + offset))
            for mode, starts in entry["starts"].items():
                mine["starts"].setdefault(mode, []).extend(dict(st, run=st.get("run", 0) + offset) for st in starts)
    out["date"], out["commit"] = docs[-1]["date"], docs[-1]["commit"]
    build_rows(out)
    return out


def device_slug(name: str) -> str:
    low = name.lower()
    for known in ("gh200", "h200", "h100", "b200", "a100", "l40s"):
        if known in low:
            return known
    return re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "gpu"


def record_name(doc: dict) -> str:
    return f"sglang_start-{doc['date'][:10]}-{device_slug(doc['device'])}.json"


def estimate(kind: str, layers: int, modes, starts: int, tpot_starts: int, save: bool) -> dict:
    """Rough seconds of one model's run (EST_* constants)."""
    per = {"eager": EST_FIXED_S, "capture": EST_FIXED_S + EST_LIVE_PER_LAYER_S[kind] * layers,
           "load": EST_FIXED_S + EST_LOAD_S, "load_auto": EST_FIXED_S + EST_LOAD_S,
           "load_late": EST_FIXED_S + EST_LOAD_S}
    per = {m: v + EST_AFTER_S for m, v in per.items() if m in modes}
    save_s = EST_FIXED_S + EST_SAVE_PER_LAYER_S[kind] * layers + EST_AFTER_S if save else 0.0
    total = save_s + starts * sum(per.values()) + min(tpot_starts, starts) * len(per) * EST_TPOT_S
    return {"save_s": save_s, "per_start_s": per, "total_s": total}


# -- plot and tables ---------------------------------------------------------------------------------------------
def plot(doc: dict, path: Path) -> None:
    """Stacked phases of each mode's median start, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(doc["models"])
    fig, axes = plt.subplots(len(keys), 1, figsize=(13, 1.0 + 2.6 * len(keys)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, key in zip(axes[:, 0], keys):
        entry = doc["models"][key]
        rows = [(m, entry.get("save", []) if m == "save" else entry["starts"].get(m, []))
                for m in ("save",) + ALL_MODES]
        rows = [(m, starts, median_start(starts)) for m, starts in rows if median_start(starts)]
        xmax = max([st["healthy_s"] for _, _, st in rows] + [1e-3])
        labelled = set()
        for i, (mode, starts, st) in enumerate(rows):
            left = 0.0
            for j, phase in enumerate(PHASES):
                v = max(st["phases_s"].get(phase) or 0.0, 0.0)
                ax.barh(i, v, left=left, color=cmap(j), label=None if phase in labelled else phase)
                labelled.add(phase)
                left += v
            n_ok = sum(1 for s in starts if s.get("ok"))
            ax.text(left + 0.01 * xmax, i, f"{st['healthy_s']:.2f} s (median start of {n_ok})", va="center",
                    fontsize=8)
        ax.set_xlim(0, 1.3 * xmax)
        ax.set_yticks(range(len(rows)), [m for m, _, _ in rows])
        ax.invert_yaxis()
        ax.set_title(f"SGLang {doc.get('sglang', '')} start, {key}", fontsize=9)
        ax.set_xlabel("seconds since launch to healthy, by phase")
        ax.legend(fontsize=7, ncol=len(PHASES), loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    fig.suptitle(f"{doc['device']} · commit {doc['commit'][:10]} · {doc['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(doc: dict) -> str:
    def f(v, digits=2):
        return "n/a" if v is None else f"{v:.{digits}f}"

    out = []
    for key, entry in doc["models"].items():
        s = entry["summary"]
        out.append(f"\n=== SGLang start, {key}, {doc['device']}, commit {doc['commit'][:10]}, {doc['date']} ===")
        out.append("| mode | starts ok | healthy median (min-max) s | first request s | graph phase s | "
                   + " | ".join(f"TPOT bs{bs} ms" for bs in TPOT_BS) + " |")
        out.append("|---|---|---|---|---|" + "---|" * len(TPOT_BS))
        for mode in ("save",) + ALL_MODES:
            m = s.get(mode)
            if not m:
                continue
            h = m["healthy_s"]
            hs = "n/a" if not h else f"{h['median']:.2f} ({h['min']:.2f}-{h['max']:.2f})"
            fr, g = m["first_request_s"], m["graph_phase_s"]
            tp = [f(m["tpot_ms"].get(str(bs), {}).get("median")) for bs in TPOT_BS]
            out.append(f"| {mode} | {m['starts_ok']} | {hs} | {f(fr and fr['median'], 3)} | {f(g and g['median'])} | "
                       + " | ".join(tp) + " |")
        out.append("\n| phase (median s) | " + " | ".join(m for m in ("save",) + ALL_MODES if m in s) + " |")
        out.append("|---|" + "---|" * sum(1 for m in ("save",) + ALL_MODES if m in s))
        for phase in PHASES:
            out.append(f"| {phase} | " + " | ".join(f(s[m]["phases_s"].get(phase)) for m in ("save",) + ALL_MODES
                                                  if m in s) + " |")
    return "\n".join(out)


# -- the run -----------------------------------------------------------------------------------------------------
def decode_tpot(base: str, streams: int, max_new: int, vocab: int) -> float | None:
    """Median ms per token over ``streams`` concurrent greedy streams (one decode batch of that size)."""
    ids = prompts(streams, vocab)
    with ThreadPoolExecutor(streams) as pool:
        marks = list(pool.map(lambda x: stream_marks(base, x[:16], max_new), ids))
    return (lambda sp: sp and sp["median"])(spread(stream_tpot_ms(m) for m in marks))


def common_flags(a) -> list[str]:
    """Flags of every server of a run besides sglang_servers.SERVER_FLAGS: one fixed KV pool, the graph sizes."""
    flags = ["--mem-fraction-static", str(a.mem_fraction), "--max-total-tokens", str(a.kv_tokens)]
    return flags + (["--cuda-graph-max-bs-decode", str(a.max_bs)] if a.max_bs else [])


def start_once(mode: str, model_dir: Path, vocab: int, archive: Path, a, logs: Path, name: str,
               tpot: bool) -> dict:
    """One server start and its measurements; never raises (an error lands in the result)."""
    extra = common_flags(a) + (["--disable-cuda-graph"] if mode == "eager" else [])
    foundry = FOUNDRY_MODE.get(mode)
    res: dict = {"mode": mode, "ok": False}
    t0 = time.perf_counter()
    srv = start_server(name, model_dir, logs, 0, foundry, archive if foundry else None, extra, env=MODE_ENV.get(mode))
    try:
        res["healthy_s"] = srv.wait_healthy(a.start_timeout, poll=0.02)
        t = time.perf_counter()
        generate(srv.base, prompts(1, vocab)[0], 1)
        res["first_request_s"] = time.perf_counter() - t
        res["sglang_startup_time"] = startup_fields(server_info(srv.base))
        res["ok"] = True
        if tpot:
            decode_tpot(srv.base, 4, 8, vocab)  # settle: the first batches pay lazy kernel loads
            res["tpot_ms"] = {str(bs): decode_tpot(srv.base, bs, a.tpot_tokens, vocab) for bs in TPOT_BS}
    except Exception as err:  # one failed start must not end the benchmark
        res["tpot_error" if res["ok"] else "error"] = f"{type(err).__name__}: {err}"[:400]
    finally:
        srv.stop()
    text = srv.text()
    res["phases_s"] = phases(log_marks(text), srv.t_launch, res.get("healthy_s"))
    res["graphs"] = {k: v for k, v in graph_facts(text).items() if k != "template"}
    res["log"] = str(srv.log)
    res["seconds"] = time.perf_counter() - t0
    return res


def run_model(name: str, a, doc: dict, run_i: int, t_begin: float, write) -> None:
    kind, depth = BENCH_MODELS[name]
    layers = a.layers or depth
    key = f"{name}-{layers}l" + (f"-maxbs{a.max_bs}" if a.max_bs else "")
    vocab = MODELS[kind]["vocab_size"]
    work = Path(a.workdir)
    model_dir = write_model(work / "models", kind, layers)
    archive = work / f"archive-{key}"
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    entry = doc["models"].setdefault(key, {"model": name, "layers": layers, "max_bs": a.max_bs,
                                           "kv_tokens": a.kv_tokens, "save": [], "starts": {},
                                           "flags": SERVER_FLAGS + common_flags(a),
                                           "config": json.loads((model_dir / "config.json").read_text())})
    stamp = time.strftime("%H%M%S")
    reuse = a.reuse_archive and any(archive.glob("*.foundry"))
    est = estimate(kind, layers, a.modes, a.starts, a.tpot_starts, not reuse)
    budget = f"; budget left {a.budget - (time.perf_counter() - t_begin):.0f} s" if a.budget else ""
    print(f"{key}: estimate {est['total_s']:.0f} s (save {est['save_s']:.0f} s, per start "
          + ", ".join(f"{m} {v:.0f} s" for m, v in est["per_start_s"].items()) + f"){budget}", flush=True)
    if reuse:
        print(f"{key}: reusing the archive in {archive} (--reuse-archive)", flush=True)
    else:
        shutil.rmtree(archive, ignore_errors=True)
        archive.mkdir(parents=True)
        st = start_once("save", model_dir, vocab, archive, a, logs, f"{key}-save-{stamp}", tpot=False)
        entry["save"].append(dict(st, run=run_i, round=0))
        print(f"{key} save: {brief(st)}", flush=True)
        write()
        if not st.get("ok"):
            print(f"{key}: the save start failed; LOAD starts will fall back (see {st['log']})", flush=True)
    took = {m: est["per_start_s"][m] for m in a.modes}
    for i in range(a.starts):
        left = a.budget - (time.perf_counter() - t_begin) if a.budget else None
        if left is not None and sum(took.values()) > left:
            doc["runs"][run_i]["stopped"] = f"{key}: before round {i} of {a.starts} ({left:.0f} s of budget left)"
            print(f"{key}: stopping before round {i}: a round takes ~{sum(took.values()):.0f} s, {left:.0f} s left "
                  "(--budget)", flush=True)
            return
        for mode in a.modes:
            st = start_once(mode, model_dir, vocab, archive, a, logs, f"{key}-{mode}-{stamp}-{i}",
                            tpot=i < a.tpot_starts)
            took[mode] = max(took[mode] if i else 0.0, st["seconds"])
            entry["starts"].setdefault(mode, []).append(dict(st, run=run_i, round=i))
            print(f"{key} {mode} #{i}: {brief(st)}", flush=True)
            write()


def brief(st: dict) -> str:
    if not st.get("ok"):
        return f"FAILED {st.get('error')} (log {st.get('log')})"
    g = st["graphs"]
    tp = st.get("tpot_ms")
    return (f"healthy {st['healthy_s']:.2f} s, first request {st['first_request_s']:.3f} s, graphs "
            f"{g.get('decode_graph_phase_s', 'n/a')} s" + (f" (restored {g['restored']}, live {g['live']})"
                                                            if "restored" in g else "")
            + (", TPOT " + ", ".join(f"bs{b} {v:.2f} ms" for b, v in tp.items() if v) if tp else "")
            + (f", TPOT FAILED {st['tpot_error']}" if "tpot_error" in st else ""))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-8b", help=f"comma list of {', '.join(BENCH_MODELS)} (qwen3-8b)")
    ap.add_argument("--layers", type=int, default=None, help="layers of every model (default: 36 and 48)")
    ap.add_argument("--starts", type=int, default=5, help="timed starts per mode, interleaved (5)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma list of eager, capture, load, load_auto, load_late (default: eager,capture,load)")
    ap.add_argument("--max-bs", type=int, default=None,
                    help="--cuda-graph-max-bs-decode of every server (default: SGLang's, 256 on an H100/H200)")
    ap.add_argument("--tpot-starts", type=int, default=1, help="starts of each mode that also time decode TPOT (1)")
    ap.add_argument("--tpot-tokens", type=int, default=64, help="new tokens per stream when timing TPOT (64)")
    ap.add_argument("--kv-tokens", type=int, default=65536, help="--max-total-tokens of every server (65536)")
    ap.add_argument("--mem-fraction", type=float, default=0.85, help="--mem-fraction-static of every server (0.85)")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds a start may take to healthy (300)")
    ap.add_argument("--budget", type=float, default=540,
                    help="seconds for the whole run: no round starts that would end later (540; 0: no limit)")
    ap.add_argument("--reuse-archive", action="store_true",
                    help="skip the save start when --workdir still holds its archive (an earlier run on this machine)")
    ap.add_argument("--workdir", default="/tmp/foundry_sglang_start", help="model configs and archives (%(default)s)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")),
                    help="folder of the JSON, the PNG and the server logs (default: $OUT, else bench/results)")
    ap.add_argument("--logs", default=None,
                    help="folder of the server logs (default: $OUT/sglang_start_logs, else <workdir>/logs)")
    ap.add_argument("--estimate", action="store_true", help="print the estimated seconds and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge records of split runs into one (in --out)")
    ap.add_argument("--plot", metavar="JSON", help="redraw the PNG next to a record and print its tables")
    return ap


def finish(doc: dict, out: Path) -> Path:
    table = build_rows(doc)
    path = out / record_name(doc)
    path.write_text(json.dumps(doc, indent=1))
    try:
        plot(doc, path.with_suffix(".png"))
    except Exception as err:  # the JSON is what counts
        print(f"no plot: {type(err).__name__}: {err}")
    print(tables(doc))
    print(f"\n{table.table()}\n\nwrote {path} and {path.with_suffix('.png').name}")
    return path


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    if a.plot or a.merge:
        docs = [json.loads(Path(p).read_text()) for p in ([a.plot] if a.plot else a.merge)]
        if a.plot:
            build_rows(docs[0])
            plot(docs[0], Path(a.plot).with_suffix(".png"))
            print(tables(docs[0]))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        finish(merge_docs(docs), out)
        return 0
    if a.logs is None:
        a.logs = str(Path(os.environ["OUT"]) / "sglang_start_logs" if os.environ.get("OUT")
                     else Path(a.workdir) / "logs")
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in names if m not in BENCH_MODELS] + [m for m in a.modes if m not in ALL_MODES]
    if bad:
        build_parser().error(f"unknown model or mode: {', '.join(bad)}")
    if a.estimate:
        for name in names:
            kind, depth = BENCH_MODELS[name]
            est = estimate(kind, a.layers or depth, a.modes, a.starts, a.tpot_starts, not a.reuse_archive)
            print(f"{name}, {a.layers or depth} layers: ~{est['total_s']:.0f} s (save {est['save_s']:.0f} s, per "
                  "start " + ", ".join(f"{m} {v:.0f} s" for m, v in est["per_start_s"].items()) + ")")
        return 0
    from tools.needs_gpu import exit_without_gpu

    exit_without_gpu("this benchmark")
    import importlib.metadata
    import importlib.util

    import torch

    if importlib.util.find_spec("sglang") is None:
        print("sglang is not importable: stage it first (docs/STAGING.md)", file=sys.stderr)
        return 2
    # /health answers as soon as SGLang is up, without its probe generation (which waits >= 1 s for a token)
    os.environ["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "0"
    for sig in (signal.SIGTERM, signal.SIGINT):  # unwind: atexit stops the servers
        signal.signal(sig, lambda *_: sys.exit(1))
    out.mkdir(parents=True, exist_ok=True)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    t_begin = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    doc = {"name": "sglang_start", "date": now, "device": torch.cuda.get_device_name(0), "commit": commit,
           "sglang": importlib.metadata.version("sglang"), "torch": torch.__version__,
           "env": {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0", "SGLANG_LOG_MS": "1"},
           "runs": [{"date": now, "commit": commit, "argv": sys.argv[1:] if argv is None else list(argv),
                     "stopped": None}],
           "models": {}, "rows": []}

    def write():
        build_rows(doc)
        (out / record_name(doc)).write_text(json.dumps(doc, indent=1))

    for name in names:
        try:
            run_model(name, a, doc, 0, t_begin, write)
        except Exception as err:
            traceback.print_exc()
            doc["runs"][0]["stopped"] = f"{name}: {type(err).__name__}: {err}"[:300]
    doc["runs"][0]["seconds"] = time.perf_counter() - t_begin
    path = finish(doc, out)
    print(f"total {doc['runs'][0]['seconds']:.0f} s; record {path}")
    return 0 if not any(r[0] == FAIL for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
