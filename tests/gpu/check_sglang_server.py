"""GPU check of the SGLang plugin on a real SGLang server: plain SGLang vs Foundry SAVE vs Foundry LOAD.

    source /tmp/foundry_stage/env.sh      # after scripts/stage_sglang.py append/install (docs/STAGING.md)
    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_sglang_server.py [--models dense[,moe]] [--out DIR]

For each model it writes a model directory (a Qwen3 config, no weights: SGLang's ``--load-format dummy`` fills
random ones; ``--skip-tokenizer-init``: requests are token ids) and starts, on GPU 0, one after the other:

1. ``python -m foundry_sglang.launch --foundry-mode auto`` with an empty archive directory: must choose SAVE;
2. plain ``python -m sglang.launch_server`` with the same flags (and the prefill-graph setting the launcher pins);
3. the same ``foundry_sglang.launch`` again: must choose LOAD, restore every decode graph and capture none.

SAVE runs first so that it, not the baseline, pays the machine's cold caches (Python bytecode, Triton kernels).
Each server reports its time to healthy and SGLang's own startup timings (``/server_info``: load_weight,
kv_cache_allocation, cuda_graph, scheduler_e2e), answers the same greedy requests (token ids must be identical to
plain SGLang's) and is timed on decode (1 and 64 concurrent streams). On a second GPU, at the same time, a
``--foundry-mode load`` start with no archive and one with a truncated archive must each fall back to live capture
with exactly one log line and serve (a TP/EP layout adds a start of another layout, TP 1, on its archive
directory). With ``--share-gpu`` (default when only one GPU is visible) every rank of a TP/EP server runs on
GPU 0 (``--foundry-ranks-share-gpu``: each rank its own NCCL host id), plain SGLang included, and the fallback
starts run on GPU 0 beside the others; servers then size their KV pool with ``--max-total-tokens`` so that several
fit on one GPU. Every row is guarded; servers are killed at exit; logs and the JSON record (rows and figures,
gpu/records.py) go to --out. Run by tests/gpu/test_sglang_server.py; without a GPU it prints one line and exits
with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gpu.verdicts, gpu.records
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tools.needs_gpu, also without PYTHONPATH

from gpu.records import write_record
from gpu.sglang_servers import (
    MODELS,
    SERVER_FLAGS,
    decode_throughput,
    graph_facts,
    greedy_answers,
    kill_all,
    prompts,
    server_info,
    start_server,
    startup_fields,
    write_model,
)
from gpu.verdicts import FAIL, PASS, SKIP, Row, Verdicts
from tools.needs_gpu import exit_without_gpu

#: Parallel layouts: server flags and the models they apply to.
LAYOUTS = {
    "tp1": {"flags": [], "models": ("dense", "moe")},
    "tp2": {"flags": ["--tp-size", "2"], "models": ("dense", "moe")},
    "ep2": {"flags": ["--tp-size", "2", "--ep-size", "2"], "models": ("moe",)},
}


def run_server(name: str, model: Path, out: Path, gpu: int, mode, archive, timeout: float, vocab: int,
               answers_for: list[list[int]] | None, max_new: int, extra=(), throughput=True, share=False) -> dict:
    res = {"name": name}
    srv = start_server(name, model, out, gpu, mode, archive, list(extra), share)
    try:
        res["healthy_s"] = round(srv.wait_healthy(timeout), 2)
        res["startup_time"] = startup_fields(server_info(srv.base))
        if answers_for is not None:
            t0 = time.perf_counter()
            res["answers"] = greedy_answers(srv.base, answers_for, max_new)
            res["first_batch_s"] = round(time.perf_counter() - t0, 2)
        if throughput:
            decode_throughput(srv.base, 4, 8, vocab)  # settle: first requests pay lazy kernel loads
            for streams in (1, 64):  # the median of 3 windows: one window of a shared GPU varies by a few %
                windows = [round(decode_throughput(srv.base, streams, 64, vocab), 1) for _ in range(3)]
                res[f"tok_s_{streams}"], res[f"tok_s_{streams}_windows"] = statistics.median(windows), windows
    except Exception as err:
        res["error"] = f"{type(err).__name__}: {err}"[:400]
    finally:
        srv.stop()
        res.update(graph_facts(srv.text()))
    return res


# -- the check ---------------------------------------------------------------------------------------------------
def fallback_checks(model: Path, out: Path, work: Path, gpu: int, save_archive: Path, saved: threading.Event,
                    timeout: float, vocab: int, ids: list[list[int]], max_new: int, results: dict,
                    tag: str = "", extra=(), share=False) -> None:
    """Beside the main starts: LOAD with no archive, then (once SAVE wrote one) LOAD with a truncated copy of it
    and, for a TP/EP layout, a TP 1 server on this layout's archive directory."""
    empty = work / f"archive-missing{tag}"
    empty.mkdir(exist_ok=True)
    results["missing"] = run_server(f"load-missing{tag}", model, out, gpu, "load", empty, timeout, vocab, ids[:4],
                                    max_new, extra, throughput=False, share=share)
    if not saved.wait(timeout=2 * timeout):
        results["corrupt"] = {"error": "no SAVE archive to corrupt"}
        return
    broken = work / f"archive-corrupt{tag}"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(save_archive, broken)
    for f in broken.rglob("*.foundry"):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    results["corrupt"] = run_server(f"load-corrupt{tag}", model, out, gpu, "load", broken, timeout, vocab, ids[:4],
                                    max_new, extra, throughput=False, share=share)
    if extra:  # a server of another layout (TP 1) pointed at this layout's archives
        other = work / f"archive-other{tag}"
        shutil.rmtree(other, ignore_errors=True)
        shutil.copytree(save_archive, other)
        results["other"] = run_server(f"load-other-layout{tag}", model, out, gpu, "load", other, timeout, vocab,
                                      ids[:4], max_new, throughput=False, share=share)


def check_model(kind: str, layers: int, args, out: Path, layout: str = "tp1") -> tuple[list, dict]:
    work = Path(args.workdir)
    model = write_model(work / "models", kind, layers)
    vocab = MODELS[kind]["vocab_size"]
    ids = prompts(args.requests, vocab)
    tag = "" if layout == "tp1" else f"-{layout}"
    extra = LAYOUTS[layout]["flags"]
    share = args.share_gpu and layout != "tp1"
    archive = work / f"archive-{kind}{tag}"
    shutil.rmtree(archive, ignore_errors=True)
    archive.mkdir(parents=True)
    results: dict = {}
    saved = threading.Event()
    side = None
    fallback_gpu = 0 if share and args.fallback_gpu is None and not args.no_fallback else args.fallback_gpu
    if fallback_gpu is not None:
        side = threading.Thread(target=fallback_checks, daemon=True,
                                args=(model, out, work, fallback_gpu, archive, saved, args.server_timeout, vocab,
                                      ids, args.max_new_tokens, results, tag, extra, share))
        side.start()

    def start(name, mode, arch, throughput=True):
        return run_server(f"{kind}{tag}-{name}", model, out, 0, mode, arch, args.server_timeout, vocab, ids,
                          args.max_new_tokens, extra, throughput, share)

    results["save"] = start("foundry-auto-1", "auto", archive)
    saved.set()
    results["plain"] = start("plain", None, None)
    if "healthy_s" in results["save"]:
        results["load"] = start("foundry-auto-2", "auto", archive)
    else:  # the first start never served: a second one would only repeat it
        results["load"] = {"name": f"{kind}{tag}-foundry-auto-2", "error": "not run: the SAVE start failed"}
    if side is not None:
        side.join(timeout=3 * args.server_timeout)
    results["archive_files"] = sorted(f.name for f in archive.rglob("*.foundry"))
    return verdicts(kind, layers, results, layout, share), results


def verdicts(kind: str, layers: int, r: dict, layout: str = "tp1", share: bool = False) -> list[Row]:
    rows = []
    tag = f"{kind} {layers}L" + ("" if layout == "tp1" else f" {layout.upper()}" + (" 1 GPU" if share else ""))
    parallel = layout != "tp1"

    def row(name, ok, detail):
        rows.append(Row(PASS if ok else (SKIP if ok is None else FAIL), f"{tag}: {name}", detail))

    def guarded(name, fn):
        try:
            ok, detail = fn()
        except Exception as err:
            ok, detail = False, f"{type(err).__name__}: {err}"[:200]
        row(name, ok, detail)

    plain, save, load = r.get("plain", {}), r.get("save", {}), r.get("load", {})
    for res in (save, plain, load):
        if "error" in res:
            row(f"{res['name']} ran", False, res["error"])

    def healthy():
        parts = []
        for label, res in (("plain", plain), ("SAVE", save), ("LOAD", load)):
            st = res.get("startup_time", {})
            cg = st.get("cuda_graph", {})
            parts.append(f"{label} {res.get('healthy_s', '-')} s (graphs {res.get('decode_graph_phase_s', '-')} s, "
                         f"load_weight {st.get('load_weight', '-')}, cuda_graph {cg or '-'}, "
                         f"scheduler_e2e {st.get('scheduler_e2e', '-')})")
        # One start per mode: whole-server time to healthy moves by seconds from start to start (imports, the
        # tokenizer manager), far more than the graph phase, so the verdict is on what Foundry changes: the graph
        # phase, and the scheduler's own start (SGLang's scheduler_e2e, within 1 s of plain's for one start each);
        # the medians of whole starts are bench/sglang_start.py's job.
        def e2e(res):
            return res.get("startup_time", {}).get("scheduler_e2e")
        ok = (all("healthy_s" in x for x in (plain, save, load))
              and load.get("decode_graph_phase_s", 1e9) < plain.get("decode_graph_phase_s", 0)
              and e2e(load) is not None and e2e(plain) is not None and e2e(load) <= e2e(plain) + 1.0)
        return ok, "; ".join(parts)
    guarded("time to healthy plain / SAVE / LOAD (LOAD: graph phase < plain, scheduler start <= plain + 1 s)", healthy)
    guarded("auto chose SAVE then LOAD",
            lambda: (save.get("chose") == "SAVE" and load.get("chose") == "LOAD",
                     f"1st start {save.get('chose')}, 2nd start {load.get('chose')}"))

    def graphs():
        bs = plain.get("bs") or load.get("bs") or []
        ok = (bool(bs) and load.get("restored") == len(bs) and load.get("live") == 0
              and save.get("recorded") == len(bs))
        ranks = ""
        if parallel:  # one summary line per rank, all alike
            ok = ok and load.get("ranks_reported") == 2 and load.get("ranks_agree") and save.get("ranks_agree")
            ranks = (f"; {load.get('ranks_reported')} ranks reported alike={load.get('ranks_agree')}; SAVE filled "
                     f"{save.get('slots_filled_at_save')} slots; template: {save.get('template', 'none')}; files "
                     f"{r.get('archive_files')}")
        return ok, (f"default decode bs list {len(bs)} sizes {bs[:5]}..{bs[-1:] if bs else ''}: SAVE recorded "
                    f"{save.get('recorded')}, LOAD restored {load.get('restored')} captured live {load.get('live')} "
                    f"in {load.get('restore_s', '-')} s (all ready after {load.get('all_graphs_ready_s', '-')} s; "
                    f"SGLang asked for the first {load.get('first_install_s', '-')} s after the restore"
                    + (f", until then in: {load['engine_wait']}" if load.get("engine_wait") else "") + f"){ranks}")
    guarded("every decode graph restored" + (" on every rank" if parallel else ""), graphs)
    if parallel:
        def one_template():
            loaded = Path(load.get("archive") or "?").name
            ok = bool(save.get("template")) and ".rank" not in loaded and load.get("chose") == "LOAD"
            return ok, (f"SAVE merged: {save.get('template', 'no template (parts kept)')}; LOAD read {loaded} on "
                        f"{load.get('ranks_reported')} ranks")
        guarded("one rank template for every rank", one_template)

    def answers(other, label):
        a, b = plain.get("answers"), other.get("answers")
        if not a or not b:
            return False, "no answers"
        same = sum(x == y for x, y in zip(a, b))
        return same == len(a) == len(b), f"{same}/{len(a)} greedy answers ({len(a[0])} tokens) identical to plain"
    guarded("greedy answers LOAD == plain", lambda: answers(load, "LOAD"))
    guarded("greedy answers SAVE == plain", lambda: answers(save, "SAVE"))

    def speed():
        details, ok = [], True
        for key in ("tok_s_1", "tok_s_64"):
            ratio = load[key] / plain[key]
            ok = ok and (abs(ratio - 1) <= 0.02 if parallel else ratio > 0.9)
            details.append(f"{key[6:]} streams: plain {plain[key]} tok/s, LOAD {load[key]} tok/s ({ratio:.3f}x; "
                           f"median of windows {plain.get(key + '_windows')} / {load.get(key + '_windows')})")
        return ok, "; ".join(details)
    guarded("decode throughput restored vs captured", speed)
    for key, label in (("missing", "LOAD with no archive"), ("corrupt", "LOAD with a truncated archive"),
                       *((("other", "TP 1 LOAD on this layout's archives"),) if parallel else ())):
        res = r.get(key)
        if res is None:
            row(f"{label} falls back", None, "not run (no second GPU or --no-fallback)")
            continue
        ranks = 2 if parallel and key != "other" else 1  # one line per rank process, each saying why
        guarded(f"{label} falls back ({ranks} line{'s' if ranks > 1 else ''}: one per rank)" if ranks > 1
                else f"{label} falls back (1 line)",
                lambda res=res, ranks=ranks: ("healthy_s" in res and len(res.get("fallback_lines", [])) == ranks
                                 and bool(res.get("bs")) and res.get("restored", 0) == 0 and bool(res.get("answers")),
                                 f"healthy {res.get('healthy_s', '-')} s, SGLang captured {len(res.get('bs', []))} "
                                 f"graphs live in {res.get('decode_graph_phase_s', '-')} s, "
                                 f"lines: {res.get('fallback_lines')} {res.get('error', '')}"))
    tb = {res.get("name"): res.get("tracebacks") for res in (save, plain, load, *(r.get(k) or {} for k in
                                                                                  ("missing", "corrupt", "other")))}
    row("no tracebacks in server logs", all(not v for v in tb.values()), json.dumps(tb))
    return rows


def plot(report: dict, device: str, path: Path) -> None:
    """Bar chart of one model's time to healthy and SGLang's graph phase: plain vs Foundry SAVE vs LOAD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in report.get("cases", []) if k in report]
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        runs = [("plain SGLang", report[kind].get("plain", {})), ("Foundry SAVE", report[kind].get("save", {})),
                ("Foundry LOAD", report[kind].get("load", {}))]
        healthy = [r.get("healthy_s", 0) for _, r in runs]
        graphs = [r.get("decode_graph_phase_s", 0) for _, r in runs]
        x = range(len(runs))
        ax.bar([i - 0.2 for i in x], healthy, 0.4, label="time to healthy (s)")
        ax.bar([i + 0.2 for i in x], graphs, 0.4, label="SGLang decode-graph phase (s)")
        for i, (h, g) in enumerate(zip(healthy, graphs)):
            ax.text(i - 0.2, h, f"{h:.1f}", ha="center", va="bottom", fontsize=8)
            ax.text(i + 0.2, g, f"{g:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [n for n, _ in runs])
        ax.set_title(f"SGLang {report.get('sglang', '')}, Qwen3 {kind} {report[kind].get('layers')} layers, "
                     f"{device}{' (ranks share 1 GPU)' if report[kind].get('share') else ''}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dense", help="comma list of dense, moe (default: dense)")
    parser.add_argument("--layouts", default="tp1",
                        help="comma list of tp1, tp2, ep2 (ep2: MoE only; default: tp1); each layout x model is a case")
    parser.add_argument("--share-gpu", action="store_true", default=None,
                        help="TP/EP ranks share GPU 0 (default: when only one GPU is visible)")
    parser.add_argument("--dense-layers", type=int, default=4, help="layers of the Qwen3-8B-shaped model (4)")
    parser.add_argument("--moe-layers", type=int, default=4, help="layers of the small Qwen3-MoE (4)")
    parser.add_argument("--max-bs", type=int, default=None,
                        help="--cuda-graph-max-bs-decode for every server (default: SGLang's, 256 on an H200)")
    parser.add_argument("--requests", type=int, default=16, help="greedy requests compared (16)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per greedy request (32)")
    parser.add_argument("--server-timeout", type=float, default=240, help="seconds to healthy before failing (240)")
    parser.add_argument("--fallback-gpu", type=int, default=None,
                        help="GPU index for the fallback starts, run in parallel (default: 1 if there are 2 GPUs)")
    parser.add_argument("--no-fallback", action="store_true", help="skip the missing/corrupt archive starts")
    parser.add_argument("--out", default=os.environ.get("OUT", "check_sglang_server_out"),
                        help="folder for server logs and sglang_server.json (default: $OUT)")
    parser.add_argument("--workdir", default="/tmp/foundry_sglang_check",
                        help="folder for the model directories and archives (default: %(default)s)")
    parser.add_argument("--commit", default=os.environ.get("FOUNDRY_COMMIT", ""),
                        help="commit recorded in the JSON (default: $FOUNDRY_COMMIT, else git rev-parse HEAD)")
    parser.add_argument("--plot-only", metavar="JSON", help="draw JSON's bar chart next to it (.png) and exit")
    args = parser.parse_args(argv)
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())  # a record, or the report alone (before records)
        plot(doc.get("figures", doc), doc.get("device", ""), Path(args.plot_only).with_suffix(".png"))
        return 0
    exit_without_gpu("this check")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(1))
    table = Verdicts("SGLang server")
    report = table.figures
    report["flags"] = SERVER_FLAGS
    device = "none"
    try:
        import torch

        n_gpus = torch.cuda.device_count()
        device = torch.cuda.get_device_name(0) if n_gpus else "none"
        report["torch"] = torch.__version__
        import sglang

        report["sglang"] = sglang.__version__
        from importlib.metadata import entry_points

        eps = [e.value for e in entry_points(group="sglang.srt.plugins")]
        table.row("plugin entry point installed", "foundry_sglang.plugin:register" in eps,
                  f"sglang {sglang.__version__}, torch {torch.__version__}, {n_gpus} GPU(s), plugins {eps}")
    except Exception as err:
        table.row("environment", False, f"{type(err).__name__}: {err}"[:300])
        n_gpus = 0
    if args.fallback_gpu is None and n_gpus >= 2 and not args.no_fallback:
        args.fallback_gpu = 1
    if args.no_fallback:
        args.fallback_gpu = None
    if args.share_gpu is None:
        args.share_gpu = n_gpus < 2
    if args.max_bs is not None:
        SERVER_FLAGS.extend(["--cuda-graph-max-bs-decode", str(args.max_bs)])
    report["cases"] = []
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        layers = args.dense_layers if kind == "dense" else args.moe_layers
        for layout in layouts:
            if kind not in LAYOUTS[layout]["models"]:
                continue
            case = kind if layout == "tp1" else f"{kind}-{layout}"
            report["cases"].append(case)
            try:
                model_rows, results = check_model(kind, layers, args, out, layout)
                table.extend(model_rows)
                report[case] = {"layers": layers, "layout": layout, "share": args.share_gpu and layout != "tp1",
                                **{k: ({kk: vv for kk, vv in v.items() if kk != "answers"} if isinstance(v, dict)
                                       else v) for k, v in results.items()}}
            except Exception as err:
                traceback.print_exc()
                table.row(f"{case}: check", False, f"{type(err).__name__}: {err}"[:300])
            write_record(out / "sglang_server.json", table, device, args.commit or None)
    kill_all()
    try:
        plot(report, device, out / "sglang_server.png")
    except Exception as err:  # matplotlib missing: the JSON is what counts
        print(f"no plot: {type(err).__name__}: {err}")
    print(f"\n{table.table()}")
    return 0 if not table.failed else 1


if __name__ == "__main__":
    sys.exit(main())
