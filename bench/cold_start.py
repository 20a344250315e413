"""Cold-start benchmark: SGLang-style live capture vs Foundry SAVE and LOAD, side by side on one GPU.

    python bench/cold_start.py [--models dense,moe] [--dense-layers N] [--moe-layers N] [--out DIR]

For each model preset (the built-in engine's Qwen3-8B-shaped dense and Qwen3-30B-A3B-shaped MoE, layer counts
cut to fit the 10-minute command limit when asked) three fresh processes run the same engine start-up:
  baseline  live capture of the whole decode batch-size list (2 warm-ups + capture each, largest first, one pool)
  save      the same capture through Foundry, plus writing the archive
  load      Foundry restore from that archive: no warm-up, no capture, no forward
Each process then replays bs 1/8/64/256 (TPOT proxy) and hashes every graph's logits on fixed inputs, so
outputs are compared bitwise across processes. Writes cold_start.json and cold_start.png to --out and prints a
short table last.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LATENCY_BS = [1, 8, 64, 256]
MAX_POS = 255  # positions < 256: 16 pages of 16 tokens per sequence
PAGE = 16
KEY_PREFIX = "bench-cold-start-v1"


def engine_args(model: str):
    from foundry_sglang.engine.config import EngineArgs

    pages = 256 * ((MAX_POS + 1) // PAGE) + 1
    return EngineArgs(model=model, device="cuda", dtype="bfloat16", max_num_seqs=256, max_model_len=4096,
                      page_size=PAGE, num_kv_pages=pages, seed=0)


def decode_inputs(runner, bs: int, seed: int):
    """Deterministic decode inputs for the first ``bs`` rows of the static buffers."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed * 1000 + bs)
    pos = torch.randint(0, MAX_POS, (bs,), generator=g)
    ids = torch.randint(0, runner.cfg.vocab_size, (bs,), generator=g)
    pages_per_seq = (MAX_POS + 1) // PAGE
    tables = 1 + torch.arange(bs).unsqueeze(1) * pages_per_seq + torch.arange(pages_per_seq).unsqueeze(0)
    slot = tables[torch.arange(bs), pos // PAGE] * PAGE + pos % PAGE
    dev = runner.device
    runner.s_input_ids[:bs].copy_(ids.to(dev))
    runner.s_positions[:bs].copy_(pos.to(dev))
    runner.s_slot_mapping[:bs].copy_(slot.to(dev))
    runner.s_seq_lens[:bs].copy_((pos + 1).to(torch.int32).to(dev))
    runner.s_block_tables[:bs].zero_()
    runner.s_block_tables[:bs, :pages_per_seq].copy_(tables.to(torch.int32).to(dev))


def fill_kv(runner) -> None:
    import torch

    g = torch.Generator(device=runner.device).manual_seed(7)
    runner.kv_cache.normal_(generator=g)


def output_hash(backend, bs: int) -> str:
    """Poison the graph's output, replay, and hash what the replay wrote."""
    import torch

    out = backend._outputs[bs]
    out.fill_(float("nan"))  # the replay must write every element
    backend.replay(bs)
    torch.cuda.synchronize()
    return hashlib.sha256(out.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def timed_replays(backend, bs: int, n: int, warmup: int = 3) -> list[float]:
    """Per-replay times (ms) of ``n`` CUDA-event-timed replays after ``warmup`` untimed ones."""
    import torch

    for _ in range(warmup):
        backend.replay(bs)
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        backend.replay(bs)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def replay_latency(runner, bs: int, iters: int = 100) -> float:
    """Median per-replay time (ms) over ``iters`` replays."""
    return median(timed_replays(runner.graph_backend, bs, iters, warmup=5))


def restored_vs_live(runner, rounds: int = 6, reps: int = 20) -> dict:
    """In the LOAD process: capture the same decode graphs live (SGLang-style) next to the restored ones and
    time them interleaved, so both see the same clocks; also compare their outputs bitwise."""
    import torch

    from foundry_sglang.engine.graphs import TorchGraphBackend

    restored = runner.graph_backend
    live = TorchGraphBackend()
    sizes = [bs for bs in LATENCY_BS if bs in runner.graph_bs]
    with live.capture_session(torch.cuda.Stream(runner.device)):
        for bs in sorted(sizes, reverse=True):
            live.capture_one(bs, lambda bs=bs: runner._decode_forward_static(bs))
    fill_kv(runner)
    result = {}
    for bs in sizes:
        decode_inputs(runner, bs, seed=3)
        same = output_hash(restored, bs) == output_hash(live, bs)
        times = {"restored": [], "live": []}
        for _ in range(rounds):
            for name, backend in (("restored", restored), ("live", live)):
                times[name] += timed_replays(backend, bs, reps)
        med = {k: median(v) for k, v in times.items()}
        result[str(bs)] = {"restored_ms": med["restored"], "live_ms": med["live"],
                           "ratio": med["restored"] / med["live"], "bitwise_equal": same}
    return result


def child(mode: str, model: str, archive: str, result: str) -> None:
    t_proc = time.perf_counter()
    import torch

    from foundry_sglang.builtin.backend import FoundryGraphBackend
    from foundry_sglang.engine.graphs import TorchGraphBackend
    from foundry_sglang.engine.model_runner import ModelRunner

    t_import = time.perf_counter() - t_proc
    args = engine_args(model)
    if mode == "baseline":
        backend = TorchGraphBackend()
    else:
        from foundry_core import Session

        session = Session(archive, mode=mode, key=f"{KEY_PREFIX}|{model}", progress=False)
        backend = FoundryGraphBackend(session)
    t0 = time.perf_counter()
    runner = ModelRunner(args, rank=0, graph_backend=backend)
    torch.cuda.synchronize()
    t_runner = time.perf_counter() - t0
    out = {"mode": mode, "model": model, "layers": runner.cfg.num_hidden_layers, "import_s": t_import,
           "runner_s": t_runner, "weights_s": runner.weights_seconds, "graphs_s": runner.capture_seconds,
           "num_graphs": len(runner.graph_bs)}
    if mode == "load":
        st = session.restore_stats
        t = time.perf_counter()
        with torch.inference_mode():
            backend.replay(runner.graph_bs[0])
        torch.cuda.synchronize()
        out["first_replay_s"] = time.perf_counter() - t
        session.wait_restored()
        st = session.restore_stats
        out["open"] = session.open_stats
        out["restore"] = {k: v for k, v in vars(st).items() if k != "per_graph"}
    if mode == "save":
        out["save"] = session.save_stats
        out["open"] = session.open_stats
        from foundry_core.archive import Archive, blob_names

        with Archive.open(archive) as a:
            m = a.manifest
            cats: dict[str, int] = {}
            seen = set()
            for name, cat in blob_names(m).items():
                b = m.blobs[name]
                if b.offset in seen:
                    continue
                seen.add(b.offset)
                cats[cat] = cats.get(cat, 0) + b.stored_size
            out["archive"] = {"bytes": os.path.getsize(archive), "by_category": cats, "images": len(m.images),
                              "templates": len(m.templates), "snapshots": len(m.snapshots),
                              "nodes": {g.key: m.templates[g.template].num_nodes for g in m.graphs if not g.is_child},
                              "kernel_nodes": sum(g.num_kernel_nodes for g in m.graphs)}
    with torch.inference_mode():  # the engine's graph outputs are inference tensors
        measure(runner, out)
        if mode == "load":
            session.close()  # stop routing this thread into the arena before capturing live graphs beside ours
            out["same_process"] = restored_vs_live(runner)
    Path(result).write_text(json.dumps(out))
    os._exit(0)  # skip interpreter teardown (NCCL/allocator destructors); results are written


def measure(runner, out: dict) -> None:
    fill_kv(runner)
    hashes = {}
    for bs in runner.graph_bs:
        decode_inputs(runner, bs, seed=1)
        hashes[str(bs)] = output_hash(runner.graph_backend, bs)
    out["hashes"] = hashes
    fill_kv(runner)
    out["latency_ms"] = {}
    for bs in LATENCY_BS:
        if bs in runner.graph_bs:
            decode_inputs(runner, bs, seed=2)
            out["latency_ms"][str(bs)] = replay_latency(runner, bs)


def run_child(mode: str, model: str, archive: str, result: Path, log) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", mode, model, archive, str(result)],
                          capture_output=True, text=True, timeout=480)
    wall = time.perf_counter() - t
    log.write(f"===== {mode} {model} rc={proc.returncode} wall={wall:.1f}s\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"{mode} {model} failed (rc={proc.returncode}):\n{tail}")
    data = json.loads(result.read_text())
    data["process_wall_s"] = wall
    return data


def summarize(name: str, base: dict, save: dict, load: dict) -> dict:
    nodes = sum(save["archive"]["nodes"].values())
    r = load["restore"]
    equal_save = sum(load["hashes"][k] == save["hashes"][k] for k in save["hashes"])
    equal_base = sum(base["hashes"][k] == save["hashes"][k] for k in save["hashes"])
    lat = {bs: {"baseline": base["latency_ms"][bs], "save": save["latency_ms"][bs], "load": load["latency_ms"][bs],
                "load_vs_baseline": load["latency_ms"][bs] / base["latency_ms"][bs]} for bs in base["latency_ms"]}
    graphs_ready = r["all_graphs_seconds"]
    return {
        "model": name, "layers": base["layers"], "graphs": base["num_graphs"], "nodes": nodes,
        "baseline_capture_s": base["graphs_s"], "save_capture_and_write_s": save["graphs_s"],
        "save_overhead_s": save["graphs_s"] - base["graphs_s"], "archive_bytes": save["archive"]["bytes"],
        "archive_by_category": save["archive"]["by_category"],
        "load_open_s": load["open"], "load_restore": r, "load_graphs_s": load["graphs_s"],
        "first_graph_ready_s": r["first_graph_seconds"], "all_graphs_ready_s": graphs_ready,
        "first_replay_s": load["first_replay_s"], "us_per_node_all_in": 1e6 * graphs_ready / max(nodes, 1),
        "us_per_node_build_instantiate": 1e6 * (r["build_seconds"] + r["instantiate_seconds"]) / max(nodes, 1),
        "speedup_capture_over_load": base["graphs_s"] / max(graphs_ready, 1e-9),
        "bitwise_equal_load_vs_save": f"{equal_save}/{len(save['hashes'])}",
        "bitwise_equal_save_vs_baseline": f"{equal_base}/{len(save['hashes'])}",
        "latency_ms": lat, "same_process_restored_vs_live": load.get("same_process", {}),
        "processes": {"baseline": base, "save": save, "load": load},
    }


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    labels, x = [], 0
    colors = {"capture (baseline)": "#888888", "map+snapshots": "#1f77b4",
              "kernel images (background, overlaps weight loading)": "#ff7f0e",
              "build": "#2ca02c", "instantiate+upload": "#d62728", "other": "#9467bd"}
    drawn = set()
    for res in results:
        r = res["load_restore"]
        ax.bar(x, res["baseline_capture_s"], color=colors["capture (baseline)"],
               label=None if "b" in drawn else "capture (baseline)")
        drawn.add("b")
        labels.append(f"{res['model']}\nbaseline")
        x += 1
        parts = [("map+snapshots", r["map_seconds"] + r["snapshot_seconds"]),
                 ("kernel images (background, overlaps weight loading)", r["images_seconds"]),
                 ("build", r["build_seconds"]), ("instantiate+upload", r["instantiate_seconds"])]
        other = max(res["all_graphs_ready_s"] - sum(v for _, v in parts), 0.0)
        bottom = 0.0
        for name, v in parts + [("other", other)]:
            ax.bar(x, v, bottom=bottom, color=colors[name], label=None if name in drawn else name)
            drawn.add(name)
            bottom += v
        labels.append(f"{res['model']}\nFoundry LOAD")
        x += 1
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("seconds of graph work, by phase")
    ax.set_title("Decode CUDA graphs: live capture vs Foundry restore (H200)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def work_dir() -> Path:
    """Where the archives go: FOUNDRY_BENCH_WORK if set, else a new private directory (a fixed /tmp path could be
    a symlink or a directory someone else prepared, and LOAD would run whatever archive they left there)."""
    chosen = os.environ.get("FOUNDRY_BENCH_WORK")
    if chosen:
        Path(chosen).mkdir(mode=0o700, parents=True, exist_ok=True)
        return Path(chosen)
    return Path(tempfile.mkdtemp(prefix="foundry-bench-"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dense,moe", help="comma list of: dense (qwen3-8b), moe (qwen3-30b-a3b)")
    ap.add_argument("--dense-layers", type=int, default=36, help="layers of the Qwen3-8B-shaped preset (36 = full)")
    ap.add_argument("--moe-layers", type=int, default=48, help="layers of the Qwen3-30B-A3B-shaped preset (48 = full)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="directory for JSON, PNG and logs")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG from a results JSON (next to it) and exit")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "MODEL", "ARCHIVE", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    if a.plot_only:
        src = Path(a.plot_only)
        plot(json.loads(src.read_text())["results"], src.with_suffix(".png"))
        return
    from tools.needs_gpu import exit_without_gpu

    exit_without_gpu()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = work_dir()
    presets = {"dense": f"builtin:qwen3-8b?num_hidden_layers={a.dense_layers}",
               "moe": f"builtin:qwen3-30b-a3b?num_hidden_layers={a.moe_layers}"}
    log = open(out / "cold_start.log", "w")
    results = []
    for name in a.models.split(","):
        model = presets[name]
        archive = str(work / f"{name}.foundry")
        if os.path.exists(archive):
            os.unlink(archive)
        runs = {mode: run_child(mode, model, archive, work / f"{name}-{mode}.json", log)
                for mode in ("baseline", "save", "load")}
        results.append(summarize(name, runs["baseline"], runs["save"], runs["load"]))
    import torch

    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0), "commit": os.environ.get("FOUNDRY_COMMIT", "unknown"),
           "torch": torch.__version__, "results": results}
    (out / "cold_start.json").write_text(json.dumps(doc, indent=1))
    plot(results, out / "cold_start.png")
    if not os.environ.get("FOUNDRY_BENCH_WORK"):
        shutil.rmtree(work, ignore_errors=True)  # archives of several GB; FOUNDRY_BENCH_WORK keeps them
    print(f"\n=== cold start, {doc['device']}, commit {doc['commit'][:10]}, {doc['date']} ===")
    for r in results:
        by_category = json.dumps({k: round(v / 1e6, 1) for k, v in r['archive_by_category'].items()})
        print(f"[{r['model']}] {r['layers']} layers, {r['graphs']} graphs, {r['nodes']} nodes, archive "
              f"{r['archive_bytes'] / 1e6:.1f} MB {by_category}")
        rs = r["load_restore"]
        print(f"  baseline capture {r['baseline_capture_s']:.2f}s | "
              f"SAVE capture+write {r['save_capture_and_write_s']:.2f}s "
              f"(+{r['save_overhead_s']:.2f}s)")
        print(f"  LOAD: open {r['load_open_s']} | map {rs['map_seconds']:.3f}s snapshots {rs['snapshot_seconds']:.3f}s "
              f"images {rs['images_seconds']:.3f}s build {rs['build_seconds']:.3f}s "
              f"inst {rs['instantiate_seconds']:.3f}s "
              f"first replay {r['first_replay_s'] * 1e3:.1f}ms")
        print(f"  first graph ready {r['first_graph_ready_s']:.3f}s, all ready {r['all_graphs_ready_s']:.3f}s "
              f"= {r['us_per_node_all_in']:.1f} us/node all-in ({r['us_per_node_build_instantiate']:.1f} build+inst; "
              f"preload wait {rs['preload_wait_seconds']:.3f}s), capture/LOAD = {r['speedup_capture_over_load']:.1f}x")
        print(f"  bitwise LOAD==SAVE {r['bitwise_equal_load_vs_save']}, "
              f"SAVE==baseline {r['bitwise_equal_save_vs_baseline']}")
        print("  replay ms, separate processes (baseline / load / ratio): " + ", ".join(
            f"bs{bs} {v['baseline']:.3f}/{v['load']:.3f}/{v['load_vs_baseline']:.3f}"
            for bs, v in r["latency_ms"].items()))
        print("  replay ms, same process interleaved (live / restored / ratio, bitwise): " + ", ".join(
            f"bs{bs} {v['live_ms']:.3f}/{v['restored_ms']:.3f}/{v['ratio']:.3f} {'=' if v['bitwise_equal'] else 'DIFF'}"
            for bs, v in r["same_process_restored_vs_live"].items()))


if __name__ == "__main__":
    main()
