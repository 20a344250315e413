"""GPU check of comm_patch: TP/EP decode graphs restored from ONE single-GPU capture, on real NCCL.

    export PYTHONPATH=$PWD:$PYTHONPATH                 # from the repo root
    python3 tests/gpu/check_comm_patch.py              # one GPU: both ranks share it (NCCL over sockets)
    python3 tests/gpu/check_comm_patch.py --gpus 2     # two GPUs: rank r on GPU r (NVLink); SAVE on GPU 0 alone
    python3 tests/gpu/check_comm_patch.py --ranks 4    # (b)-(d) with four ranks, all on GPU 0
    python3 tests/gpu/check_comm_patch.py --template-costs   # (e) only

Rows:
  (a) the TP=2 warm-up deadlock of the old wiring (rank 0's graph backend without the runner's barrier)
      reproduced with a timeout, then TP=2 with the runner-owned barrier: greedy tokens equal TP=1, graphs on;
  (b) SAVE once (the virtual ranks captured in fresh processes on one GPU, merged into one rank template), then
      LOAD in two fresh rank processes: every batch size and several input sets bitwise equal to live-captured
      TP=2 graphs in the same processes (outputs poisoned first; live replay-to-replay determinism checked);
  (c) per-rank materialisation (slot) time and LOAD per rank against single-GPU (TP=1) LOAD of the same model;
      node anatomy of the restored graphs; replay latency restored vs live;
  (b)/(c) also: every restore() phase per rank (``RestoreStats.summary``; all of them in the JSON) and what each
      archive's LOAD writes back besides the graphs (snapshots, capture region, graph outputs inside snapshots);
  (d) EP=2 with the MoE preset, the same way;
  (e) with --template-costs, alone: the SAVE time of the TP=2, TP=4 and EP=4 templates on one GPU against one
      live capture of the same model (TP=1, fresh process), how many captures each took, which ranks were derived.
--ranks 4 runs (b)-(d) with four ranks sharing GPU 0 (each its own NCCL host id, a smaller KV pool), (a0)/(a)
stay TP=2 only (SKIP rows); --dense-layers/--moe-layers deepen the presets (4 layers each by default).
The rows and figures go to $OUT/check_comm_patch.json (gpu/records.py). The verdict table is printed last.
Run by tests/gpu/test_comm_patch.py; without the GPUs it needs it prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gpu.verdicts, gpu.records
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tools.needs_gpu, also without PYTHONPATH

from gpu.records import write_record
from gpu.verdicts import Verdicts
from tools.needs_gpu import exit_without_gpu

VERDICTS = Verdicts("comm_patch")
row = VERDICTS.row
DETAILS = VERDICTS.figures
DENSE = "builtin:qwen3-8b?num_hidden_layers=4"
MOE = "builtin:qwen3-30b-a3b?num_hidden_layers=4"
SIZES_ALL = [1, 2, 4, 8, 12] + list(range(16, 257, 8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def archive_facts(path) -> dict:
    """What LOAD of ``path`` writes back besides the graphs (snapshots, capture region, outputs inside snapshots),
    read from the manifest alone (``foundry_core.save.snapshot_facts``), plus the file size."""
    from foundry_core.archive import Archive
    from foundry_core.save import snapshot_facts

    with Archive.open(path) as a:
        facts = snapshot_facts(a.manifest)
        facts["archive_bytes"] = a.file_size
    return facts


def describe_facts(f: dict) -> str:
    mib = 2 ** 20
    notes = ", ".join(f"{k} {v / mib:.1f} MiB" for k, v in sorted(f["snapshot_bytes_by_note"].items()))
    return (f"{f['snapshots']} snapshots, {f['snapshot_bytes'] / mib:.1f} MiB ({notes or 'none'}) stored as "
            f"{f['snapshot_stored_bytes'] / mib:.1f} MiB; capture region {f['capture_region_bytes'] / mib:.0f} MiB; "
            f"graph outputs inside snapshots: {f['outputs_in_snapshots']}/{f['outputs']} "
            f"({f['output_bytes_in_snapshots'] / mib:.1f} MiB; expected 0: outputs belong in the graph pool); "
            f"archive {f['archive_bytes'] / mib:.1f} MiB")


def kv_pages(world: int) -> dict:
    """Ranks beyond two share one GPU with smaller KV pools (two keep the engine_args default, 4096 pages)."""
    return {} if world <= 2 else {"num_kv_pages": 8192 // world}


def engine_args(model, world, gpus, kind="tp", **kw):
    from foundry_sglang.engine import EngineArgs

    ids = [0] * world if gpus == 1 else list(range(world))
    par = {"tp": world} if kind == "tp" else {"ep": world}
    base = dict(model=model, device="cuda", max_model_len=2048, max_num_seqs=256, num_kv_pages=4096,
                dtype="bfloat16", gpu_ids=ids, dist_port=free_port())
    base.update(par)
    base.update(kw)
    return EngineArgs(**base)


# ---------------------------------------------------------------------------------------------------------------
# rank processes
# ---------------------------------------------------------------------------------------------------------------
def _node_anatomy(graph_handle: int) -> dict:
    from cuda.bindings import driver as drv

    names = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "child", 5: "empty", 6: "event_wait",
             7: "event_record", 8: "sem_signal", 9: "sem_wait", 10: "mem_alloc", 11: "mem_free", 12: "batch_memop",
             13: "conditional"}
    g = drv.CUgraph(graph_handle)
    err, _, n = drv.cuGraphGetNodes(g, 0)
    err, nodes, n = drv.cuGraphGetNodes(g, n)
    out: dict[str, int] = {}
    for node in nodes[:n]:
        err, t = drv.cuGraphNodeGetType(node)
        k = names.get(int(t), str(int(t)))
        out[k] = out.get(k, 0) + 1
    return out


def _fill_inputs(runner, bs, gen):
    """Random but valid decode inputs in the runner's static buffers (identical on every rank: same seed)."""
    import torch

    vocab = runner.cfg.vocab_size
    pages = runner.num_kv_pages
    width = runner.max_pages_per_seq
    seq = torch.randint(1, 64 * runner.page_size, (bs,), generator=gen)
    tables = torch.randint(1, pages, (bs, width), generator=gen, dtype=torch.int64)
    pos = seq - 1
    # Each sequence writes its new K/V into a page no other sequence of the batch uses for writing: two writes
    # to one slot would race (replay-to-replay nondeterminism of the inputs, not of the graphs).
    tables[torch.arange(bs), pos // runner.page_size] = torch.randperm(pages - 1, generator=gen)[:bs] + 1
    tables = tables.to(torch.int32)
    slot = tables[torch.arange(bs), pos // runner.page_size].long() * runner.page_size + pos % runner.page_size
    runner.s_input_ids[:bs].copy_(torch.randint(0, vocab, (bs,), generator=gen))
    runner.s_positions[:bs].copy_(pos)
    runner.s_slot_mapping[:bs].copy_(slot)
    runner.s_seq_lens[:bs].copy_(seq.to(torch.int32))
    runner.s_block_tables[:bs].copy_(tables)


def rank_compare(rank, cfg, q):
    """LOAD from the template (or capture live when ``cfg['live_only']``), live-capture the same graphs in this
    process and compare them bitwise."""
    try:
        import torch

        from foundry_sglang.builtin.backend import make_graph_backend
        from foundry_sglang.engine import EngineArgs
        from foundry_sglang.engine.graphs import TorchGraphBackend
        from foundry_sglang.engine.model_runner import ModelRunner

        logging.basicConfig(level=logging.WARNING)
        args = EngineArgs(**cfg["args"])
        res: dict = {"rank": rank}
        t0 = time.perf_counter()
        runner = ModelRunner(args, rank=rank, graph_backend_factory=make_graph_backend)
        res["init_s"] = time.perf_counter() - t0
        res["weights_s"] = runner.weights_seconds
        backend = runner.graph_backend
        res["graphs_s"] = backend.capture_seconds
        res["fallback"] = getattr(backend, "fallback_reason", None)
        session = getattr(backend, "session", None)
        if session is not None and session.mode == "load" and not res["fallback"]:
            t = time.perf_counter()
            session.wait_restored()
            st = session.restore_stats
            res.update(restore_wait_s=time.perf_counter() - t, first_graph_s=st.first_graph_seconds,
                       all_graphs_s=st.all_graphs_seconds, slot_s=st.slot_seconds, slots=st.num_slots,
                       build_s=st.build_seconds, inst_s=st.instantiate_seconds, nodes=st.num_nodes,
                       preload_wait_s=st.preload_wait_seconds, images_s=st.images_seconds,
                       restore_stats=st.phases(), restore_summary=st.summary())
            g1 = backend._graphs[min(backend._graphs)]
            res["anatomy_bs1"] = _node_anatomy(g1._graph)
            session.close()  # the live graphs below must not allocate from the arena's pools
        if cfg.get("timing_only"):
            q.put(res)
            return
        sizes = args.graph_batch_sizes()
        live = TorchGraphBackend()
        live.barrier = runner.barrier
        stream = torch.cuda.Stream()
        t = time.perf_counter()
        with torch.inference_mode(), live.capture_session(stream):
            for bs in sorted(sizes, reverse=True):
                live.capture_one(bs, lambda bs=bs: runner._decode_forward_static(bs))
        torch.cuda.synchronize()
        res["live_capture_s"] = time.perf_counter() - t
        gen = torch.Generator().manual_seed(cfg.get("seed", 1234))
        equal = nondet = total = 0
        first_bad = None
        with torch.inference_mode():
            for set_i in range(cfg.get("input_sets", 3)):
                for bs in sizes:
                    _fill_inputs(runner, bs, gen)
                    outs = []
                    for which in (backend, live, live):
                        out = which._outputs[bs]
                        out.fill_(float("nan"))
                        which.replay(bs)
                        torch.cuda.synchronize()
                        outs.append(out.clone())
                    total += 1
                    if torch.equal(outs[1], outs[2]):
                        if torch.equal(outs[0], outs[1]):
                            equal += 1
                        elif first_bad is None:
                            first_bad = (set_i, bs, float((outs[0] - outs[1]).abs().nan_to_num(1e9).max()))
                    else:
                        nondet += 1
            res.update(equal=equal, total=total, nondeterministic=nondet, first_bad=first_bad)
            # replay latency, interleaved restored/live, events
            lat = {}
            for bs in [b for b in (1, 8, 64, 256) if b in sizes]:
                _fill_inputs(runner, bs, gen)
                times = {"restored": [], "live": []}
                for _ in range(3):
                    backend.replay(bs)
                    live.replay(bs)
                for _ in range(cfg.get("latency_iters", 20)):
                    for name, which in (("restored", backend), ("live", live)):
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        which.replay(bs)
                        b.record()
                        b.synchronize()
                        times[name].append(a.elapsed_time(b))
                lat[bs] = {k: statistics.median(v) for k, v in times.items()}
            res["replay_ms"] = lat
        q.put(res)
    except BaseException as e:  # reported as a row by the parent
        q.put({"rank": rank, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]})


def rank_old_wiring(rank, cfg, q):
    """The old wiring: rank 0's backend built by the caller ignores the runner's barrier (the TP=2 deadlock)."""
    try:
        from foundry_sglang.engine import EngineArgs
        from foundry_sglang.engine.graphs import TorchGraphBackend
        from foundry_sglang.engine.model_runner import ModelRunner

        class Deaf(TorchGraphBackend):
            @property
            def barrier(self):
                return lambda: None

            @barrier.setter
            def barrier(self, value):
                pass

        args = EngineArgs(**cfg["args"])
        ModelRunner(args, rank=rank, graph_backend=Deaf() if rank == 0 else None)
        q.put({"rank": rank, "finished": True})
    except BaseException as e:
        q.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})


def run_ranks(target, cfg, world, timeout):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, cfg, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.time() + timeout
    while len(results) < world and time.time() < deadline:
        try:
            r = q.get(timeout=max(0.1, min(5.0, deadline - time.time())))
            results[r["rank"]] = r
        except Exception:
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    return results


# ---------------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------------
def check_old_wiring_deadlocks(gpus):
    cfg = {"args": engine_args(DENSE, 2, gpus, cuda_graph_bs=[1, 8]).__dict__}
    t = time.perf_counter()
    res = run_ranks(rank_old_wiring, cfg, 2, timeout=40)
    hung = not any(r.get("finished") for r in res.values())
    what = "no rank finished start-up in 40 s (deadlock reproduced)" if hung else res
    row("(a) old wiring deadlocks", True if hung else "WARN", f"rank 0 backend without the runner's barrier: {what}")
    DETAILS["deadlock_repro_s"] = time.perf_counter() - t


def check_tp_greedy(gpus):
    from foundry_sglang.engine import LLMEngine, SamplingParams

    prompts = [[(7 * i + 3 * j) % 1000 + 1 for j in range(12 + i)] for i in range(16)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    def greedy(args):
        eng = LLMEngine(args)
        try:
            ids = [eng.add_request(p, sp).request_id for p in prompts]
            done = {}
            while eng.has_unfinished():
                for o in eng.step():
                    if o.finished:
                        done[o.request_id] = o.token_ids
            graphs = eng.runner.graph_bs
            return [done[i] for i in ids], graphs
        finally:
            eng.shutdown()

    t = time.perf_counter()
    ref, _ = greedy(engine_args(DENSE, 1, gpus, dtype="float32", tp=1, gpu_ids=[0], disable_cuda_graph=True,
                                cuda_graph_bs=[1, 8, 16]))
    tp2, graphs = greedy(engine_args(DENSE, 2, gpus, dtype="float32", cuda_graph_bs=[1, 8, 16]))
    same = sum(a == b for a, b in zip(ref, tp2))
    row("(a) TP=2 (fixed) greedy == TP=1", same == len(prompts) and bool(graphs),
        f"{same}/{len(prompts)} sequences of 16 tokens identical (fp32; TP=1 eager, TP=2 decode graphs {graphs}); "
        f"{time.perf_counter() - t:.1f} s")


def save_layout_template(model, kind, gpus, label, world):
    """SAVE of a layout's rank template on GPU 0 (``save_template``): its engine args (Foundry LOAD of a fresh
    archive directory), the template's path, the TemplateReport and the seconds the SAVE took."""
    from foundry_sglang.builtin.backend import FoundryGraphBackend
    from foundry_sglang.builtin.template import save_template
    from foundry_sglang.graphs.settings import FoundryConfig

    out_dir = tempfile.mkdtemp(prefix=f"foundry-{label}-")
    args = engine_args(model, world, gpus, kind, foundry=FoundryConfig.resolve("load", out_dir), **kv_pages(world))
    backend = FoundryGraphBackend.from_engine_args(args, rank=0)
    path, key = backend.session.path, backend.session.key
    t = time.perf_counter()
    rep = save_template(args, path, key, gpu=0)
    return args, path, rep, time.perf_counter() - t


def check_template(model, kind, gpus, label, sets, world=2):
    import torch

    from foundry_core.archive import Archive

    args, path, rep, save_s = save_layout_template(model, kind, gpus, label, world)

    with Archive.open(path) as a:
        m = a.manifest
        info = dict(graphs=len(m.graphs), templates=len(m.templates), slots=len(m.slots),
                    deltas={d.rank: {"args": sum(len(p.data) for p in d.patches if p.graph >= 0),
                                     "snapshots": sum(len(p.data) for p in d.patches if p.snapshot >= 0)}
                            for d in m.ranks.deltas},
                    noise=m.ranks.noise_bytes, mb=round(path.stat().st_size / 2**20, 1))
    DETAILS[f"{label}_template"] = dict(info, capture_s=rep.capture_seconds, merge_s=rep.merge_seconds, total_s=save_s,
                                        delta_by_kernel=rep.by_kernel, derived=rep.derived)
    DETAILS[f"{label}_template_writes_back"] = facts = archive_facts(path)
    row(f"({label}) what the template's LOAD writes back", None, describe_facts(facts))
    top = sorted(rep.by_kernel.items(), key=lambda kv: -kv[1])[:4]
    row(f"({label}) where rank deltas fall", None, ", ".join(f"{k[:60]}: {v} B" for k, v in top) or "nowhere")
    row(f"({label}) SAVE one GPU -> rank template", True,
        f"{info['graphs']} graphs, {info['templates']} topologies, {info['slots']} collective slots, per-rank delta "
        f"bytes {info['deltas']}, noise masked {info['noise']} B, {info['mb']} MB; captures "
        + ", ".join(f"{k} {v:.1f}s" for k, v in rep.capture_seconds.items()) + f", merge {rep.merge_seconds:.1f}s"
        + (f"; ranks {rep.derived} derived" if rep.derived else ""))
    torch.cuda.empty_cache()
    return compare_ranks(args, label, sets, world)


def compare_ranks(args, label, sets, world, title=None):
    """LOAD the layout's template in ``world`` fresh rank processes, each against its own live capture (bitwise,
    ``sets`` input sets per batch size); rows under ``title`` (default ``LOAD xN bitwise == live``)."""
    title = title or f"LOAD x{world} bitwise == live"
    # More than two ranks on one GPU time-slice it (every collective waits for each peer's turn): replay latency
    # says little there, so it is sampled lightly.
    cfg = {"args": dict(args.__dict__, dist_port=free_port()), "input_sets": sets,
           "latency_iters": 20 if world <= 2 else 3}
    res = run_ranks(rank_compare, cfg, world, timeout=400)
    DETAILS[f"{label}_ranks"] = res
    errors = [f"rank {r['rank']}: {r['error']}" for r in res.values() if "error" in r]
    if errors or len(res) < world:
        row(f"({label}) {title}", False, "; ".join(errors) or f"only {len(res)} ranks answered")
        for r in res.values():
            if "trace" in r:
                print(r["trace"])
        return None
    fb = [r["fallback"] for r in res.values() if r.get("fallback")]
    eq = sum(r["equal"] for r in res.values())
    tot = sum(r["total"] for r in res.values())
    nd = sum(r["nondeterministic"] for r in res.values())
    ok = not fb and eq == tot - nd and tot > 0 and nd == 0
    row(f"({label}) {title}", ok if not fb else False,
        f"{eq}/{tot} (rank x batch size x input set) equal, {nd} live-nondeterministic; fallback: {fb or 'none'}; "
        f"first mismatch {[r['first_bad'] for r in res.values() if r['first_bad']][:1]}")
    r0 = res[0]
    row(f"({label}) per-rank LOAD", None,
        " | ".join(f"rank {r['rank']}: graphs {r['graphs_s']:.3f}s (slots {r.get('slots')} in "
                   f"{r.get('slot_s', 0):.3f}s, build {r.get('build_s', 0):.3f}s, inst {r.get('inst_s', 0):.3f}s, "
                   "all ready "
                   f"{r.get('all_graphs_s', 0):.3f}s; waited for the preloader {r.get('preload_wait_s', 0):.3f}s, "
                   f"its images {r.get('images_s', 0):.3f}s), live capture {r['live_capture_s']:.2f}s"
                   for r in res.values()))
    for r in sorted(res.values(), key=lambda x: x["rank"]):
        row(f"({label}) rank {r['rank']} restore() phases", None, r.get("restore_summary", "no restore stats"))
    row(f"({label}) node anatomy bs1 (restored)", None, str(r0.get("anatomy_bs1")))
    lat = r0.get("replay_ms", {})
    row(f"({label}) replay ms restored/live", None,
        ", ".join(f"bs{b}: {v['restored']:.3f}/{v['live']:.3f} ({v['restored'] / v['live']:.3f})"
                  for b, v in lat.items()))
    return res


def check_single_gpu_load(model, gpus, label, tp_res):
    """TP=1 SAVE then LOAD of the same model in fresh processes: the single-GPU LOAD time to compare with."""
    from foundry_sglang.graphs.settings import FoundryConfig

    out_dir = tempfile.mkdtemp(prefix=f"foundry-{label}-tp1-")
    args = engine_args(model, 1, gpus, "tp", tp=1, gpu_ids=[0], foundry=FoundryConfig.resolve("save", out_dir))
    res = run_ranks(rank_compare, {"args": args.__dict__, "timing_only": True}, 1, timeout=300)
    if 0 not in res or "error" in res[0]:
        row(f"({label}) single-GPU LOAD", False, str(res.get(0, {}).get("error", "no answer")))
        return
    saved = sorted(Path(out_dir).rglob("*.foundry"))
    if saved:
        DETAILS[f"{label}_tp1_writes_back"] = facts = archive_facts(saved[0])
        row(f"({label}) what the TP=1 LOAD writes back", None, describe_facts(facts))
    args = engine_args(model, 1, gpus, "tp", tp=1, gpu_ids=[0], foundry=FoundryConfig.resolve("load", out_dir))
    res = run_ranks(rank_compare, {"args": args.__dict__, "timing_only": True}, 1, timeout=300)
    r = res.get(0, {})
    if "error" in r or "graphs_s" not in r:
        row(f"({label}) single-GPU LOAD", False, str(r.get("error", "no answer")))
        return
    DETAILS[f"{label}_tp1_load"] = r
    # The rank that reaches restore() last never waits for a peer at NCCL's lazy connection set-up; the one that
    # came earlier does. The last arriver's time is the LOAD cost a layout pays; both are reported.
    times = {x["rank"]: x["graphs_s"] + x.get("restore_wait_s", 0) for x in tp_res.values()}
    per_rank = min(times.values())
    single = r["graphs_s"] + r.get("restore_wait_s", 0)
    # A verdict on separate GPUs only: ranks sharing one GPU time-slice it with each other's NCCL proxies (replays
    # there run ~30x slower than on NVLink), so their start-up times say nothing about a real deployment.
    row(f"({label}) LOAD per rank vs single GPU", per_rank - single <= 0.1 if gpus > 1 else None,
        f"TP={len(times)} rank {per_rank:.3f}s (ranks: " + ", ".join(f"{k}: {v:.3f}s" for k, v in sorted(times.items()))
        + f"; the earlier one waits for its peer) vs TP=1 {single:.3f}s (preloader wait "
        f"{r.get('preload_wait_s', 0):.3f}s, images {r.get('images_s', 0):.3f}s, first graph "
        f"{r.get('first_graph_s', 0):.3f}s): {per_rank - single:+.3f}s "
        "(restore() + background instantiation until all graphs are ready; target <= +0.1 s)")
    row(f"({label}) TP=1 restore() phases", None, r.get("restore_summary", "no restore stats"))


def drop_argument_deltas(path) -> int:
    """Rewrite the rank template at ``path`` with every rank's kernel-argument patches dropped (snapshot patches,
    rank values in device memory, stay): each rank then launches rank 0's argument bytes, as a derived rank would.
    Ranks stored as variants keep their own graphs. Returns the bytes dropped (an experiment, not a product path:
    it tells whether the argument bytes by which captured ranks differ from rank 0 beyond the noise matter to any
    output)."""
    import msgspec

    from foundry_core import trust
    from foundry_core.archive import Archive, ArchiveWriter, blob_names
    from foundry_core.options import Options

    path = Path(path)
    options = Options.from_env()
    with Archive.open(path, options) as a:  # read whole before the writer replaces the file (atomically)
        m = a.manifest
        dropped = sum(len(p.data) for d in m.ranks.deltas for p in d.patches if p.snapshot < 0)
        deltas = [msgspec.structs.replace(d, patches=[p for p in d.patches if p.snapshot >= 0]) for d in m.ranks.deltas]
        blobs = {name: (a.blob(name), m.blobs[name].codec != "raw") for name in sorted(blob_names(m))}
    with ArchiveWriter(path, sign_key=trust.configured_key(options)) as w:
        for name, (data, compress) in blobs.items():
            w.add_blob(name, data, compress=compress)
        w.finish(msgspec.structs.replace(m, ranks=msgspec.structs.replace(m.ranks, deltas=deltas)))
    return dropped


#: (e): layout -> (preset, kind, ranks)
COST_LAYOUTS = {"tp2": ("dense", "tp", 2), "tp4": ("dense", "tp", 4), "ep4": ("moe", "ep", 4)}


def live_capture_once(model, gpus) -> dict:
    """One live capture of ``model`` at TP=1 in a fresh process, no Foundry: its figures plus ``wall_s`` (from
    the spawn to the ready graphs, as a template capture is timed from its process start)."""
    args = engine_args(model, 1, gpus, "tp", tp=1, gpu_ids=[0])
    t = time.perf_counter()
    res = run_ranks(rank_compare, {"args": args.__dict__, "timing_only": True}, 1, timeout=300)
    return dict(res.get(0, {"error": "no answer"}), wall_s=time.perf_counter() - t)


def check_template_costs(gpus, layouts, forced_derivation=False, sets=3):
    """(e) Template SAVE time per layout against one live capture; how many captures it took, which ranks were
    derived. Captures are constant in the rank count: rank 0, its noise capture, the last rank as the check.
    ``forced_derivation``: where ranks were not derived, LOAD every rank with the argument deltas dropped
    (:func:`drop_argument_deltas`) and compare it bitwise with live capture."""
    presets = {"dense": DENSE, "moe": MOE}
    live = {}
    for name in [n for n in presets if any(COST_LAYOUTS[x][0] == n for x in layouts)]:
        r = live_capture_once(presets[name], gpus)
        DETAILS[f"e_live_{name}"] = r
        if "error" in r or "graphs_s" not in r:
            row(f"(e) one live capture, {name}", False, str(r.get("error", "no graphs"))[:300])
            continue
        live[name] = r
        row(f"(e) one live capture, {name}", None,
            f"{presets[name]} TP=1, fresh process: {r['wall_s']:.1f} s from spawn to ready graphs (init "
            f"{r['init_s']:.1f} s, weights {r['weights_s']:.1f} s, graphs {r['graphs_s']:.1f} s)")
    for label in layouts:
        name, kind, world = COST_LAYOUTS[label]
        try:
            args, path, rep, save_s = save_layout_template(presets[name], kind, gpus, f"e-{label}", world)
        except Exception as e:  # the other layouts still run
            row(f"(e) {label.upper()} template in 3 captures, ranks derived", False, f"{type(e).__name__}: {e}"[:300])
            traceback.print_exc()
            continue
        n = len(rep.capture_seconds)
        ok = n <= 3 and rep.derived == list(range(1, world - 1))
        base = live.get(name)
        DETAILS[f"e_{label}"] = {"world": world, "captures": n, "capture_s": rep.capture_seconds,
                                 "derived": rep.derived, "merge_s": rep.merge_seconds, "total_s": save_s,
                                 "live_wall_s": base and base["wall_s"], "summary": rep.summary,
                                 "delta_by_kernel": rep.by_kernel}
        top = sorted(rep.by_kernel.items(), key=lambda kv: -kv[1])[:3]
        row(f"(e) {label.upper()} template in 3 captures, ranks derived", ok,
            f"{n} captures (" + ", ".join(f"{k} {v:.1f}s" for k, v in rep.capture_seconds.items())
            + f"), ranks derived {rep.derived or 'none'}, merge {rep.merge_seconds:.1f}s; SAVE {save_s:.1f} s"
            + (f" = {save_s / base['wall_s']:.2f}x one live capture ({base['wall_s']:.1f} s)" if base else "")
            + f"; {rep.summary}" + ("" if ok or not top else "; deltas in " + ", ".join(
                f"{k[:50]}: {v} B" for k, v in top)))
        if forced_derivation and not rep.derived and world > 2:
            try:
                dropped = drop_argument_deltas(path)
            except Exception as e:  # the other layouts still run
                row(f"(e-{label}) rank 0's argument bytes on every rank", False, f"{type(e).__name__}: {e}"[:300])
                continue
            DETAILS[f"e_{label}"]["forced_dropped_bytes"] = dropped
            res = compare_ranks(args, f"e-{label}", sets, world,
                                title=f"every rank with rank 0's argument bytes ({dropped} B of deltas dropped) "
                                      "bitwise == live")
            DETAILS[f"e_{label}_forced"] = res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=1, choices=[1, 2], help="1: every rank on GPU 0; 2: rank r on GPU r")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: a0 (old-wiring deadlock), a, b, c, d")
    ap.add_argument("--input-sets", type=int, default=3, help="fresh random input sets per batch size")
    ap.add_argument("--ranks", type=int, default=2, choices=[2, 4, 8],
                    help="ranks of the (b)-(d) layouts (2); more than 2 share GPU 0 (--gpus 1); (a0)/(a) need 2")
    ap.add_argument("--template-costs", action="store_true",
                    help="run (e) alone: template SAVE time on one GPU against one live capture")
    ap.add_argument("--cost-layouts", default=",".join(COST_LAYOUTS),
                    help=f"comma list of the (e) layouts ({', '.join(COST_LAYOUTS)})")
    ap.add_argument("--forced-derivation", action="store_true",
                    help="with --template-costs: where ranks were not derived, LOAD every rank with the argument "
                         "deltas dropped and compare it bitwise with live (an experiment: do those bytes matter?)")
    ap.add_argument("--dense-layers", type=int, default=4, help="layers of the qwen3-8b preset (4)")
    ap.add_argument("--moe-layers", type=int, default=4, help="layers of the qwen3-30b-a3b preset (4)")
    ns = ap.parse_args()
    if ns.ranks > 2 and ns.gpus != 1:
        ap.error("--ranks above 2 puts every rank on GPU 0: use it with --gpus 1")
    layouts = [x for x in ns.cost_layouts.split(",") if x]
    if any(x not in COST_LAYOUTS for x in layouts):
        ap.error(f"--cost-layouts: choose from {', '.join(COST_LAYOUTS)}")
    exit_without_gpu("this check", ns.gpus)
    global DENSE, MOE
    DENSE = f"builtin:qwen3-8b?num_hidden_layers={ns.dense_layers}"
    MOE = f"builtin:qwen3-30b-a3b?num_hidden_layers={ns.moe_layers}"
    # No NVLink multicast (NVLS): not every host allows it; the rank processes inherit these.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    skip = set(ns.skip.split(","))
    t_start = time.perf_counter()
    import torch

    DETAILS.update(device=torch.cuda.get_device_name(0), gpus=ns.gpus, torch=torch.__version__,
                   nccl=".".join(map(str, torch.cuda.nccl.version())), ranks=ns.ranks, models=[DENSE, MOE])
    print(f"check_comm_patch: {DETAILS['device']} x{torch.cuda.device_count()}, {ns.ranks} ranks on "
          f"{'one GPU' if ns.gpus == 1 else 'two GPUs'}, torch {torch.__version__}, NCCL {DETAILS['nccl']}", flush=True)

    def dense():
        DETAILS["b_res"] = check_template(DENSE, "tp", ns.gpus, "b", ns.input_sets, ns.ranks)

    parts = (("a0", lambda: check_old_wiring_deadlocks(ns.gpus)),
             ("a", lambda: check_tp_greedy(ns.gpus)),
             ("b", dense),
             ("c", lambda: check_single_gpu_load(DENSE, ns.gpus, "c", DETAILS.get("b_res") or {})),
             ("d", lambda: check_template(MOE, "ep", ns.gpus, "d", ns.input_sets, ns.ranks)))
    if ns.template_costs:
        parts = (("e", lambda: check_template_costs(ns.gpus, layouts, ns.forced_derivation, ns.input_sets)),)
    for part, fn in parts:
        if part in skip:
            continue
        if part in ("a0", "a") and ns.ranks != 2:
            row(f"({part}) TP=2 wiring", "SKIP", f"runs with --ranks 2 (this run: --ranks {ns.ranks})")
            continue
        try:
            fn()
        except Exception as e:
            row(f"({part}) crashed", False, f"{type(e).__name__}: {e}")
            traceback.print_exc()
    DETAILS["total_s"] = time.perf_counter() - t_start
    if os.environ.get("OUT"):
        write_record(Path(os.environ["OUT"]) / "check_comm_patch.json", VERDICTS, DETAILS["device"])
    print(f"\ntotal {DETAILS['total_s']:.1f} s\n")
    print(VERDICTS.table())
    return 0 if not VERDICTS.failed else 1


if __name__ == "__main__":
    sys.exit(main())
