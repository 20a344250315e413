"""GPU check for issue 11 (never silent garbage, third-party model code, random numbers inside graphs).

    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_fidelity.py [--out DIR] [--only NAME,...] [--jobs N]

Every check runs SAVE and LOAD in fresh processes (children of this script, with timeouts) and compares outputs
bitwise (outputs poisoned before each replay). Rows:

* layout: same-size reorder after the weights -> refused naming the divergent allocation; the graph backend in
  auto mode falls back to live capture (outputs still == SAVE); 1 GiB extra allocation -> refused; the normal
  LOAD order restores bitwise; LOAD cost of the layout check for a 10,000-record trace;
* gemm: the bf16 GEMM toy (cuBLASLt split-K GEMMs whose kernels a programmatic/PDL edge links) restores bitwise
  in every variant (``check_gemm_toy``; it restored to garbage until edges with edge data were added one per
  driver call, docs/FIDELITY.md "The bf16 GEMM toy"); the variants and the last row tell mechanisms apart if it
  ever fails again;
* third-party model code: transformers' own Qwen3 and Qwen3-MoE modeling classes (small random-weight configs),
  static-cache decode graphs over several batch sizes, two successive steps per input set;
* RNG: a graph with dropout and torch.randn; restored stream == live stream over 5 replays;
* pointer check: a real out-of-arena pointer is refused (tensor made before open(); foreign memory as a whole
  parameter), a stale foreign value in a struct's unused bytes does not block SAVE and restores bitwise;
* tests/gpu/check_core.py still passes.

Each check is independent (one failure does not hide the others). Details go to DIR (default $OUT).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KEY = "check-fidelity-v1"
HIDDEN = 1024
TOY_BS = [8, 2]
QWEN_BS = [8, 4, 1]
QWEN_CACHE_LEN = 64
SEEDS = [11, 22, 33]


# =====================================================================================================================
# helpers used by the child processes
# =====================================================================================================================
def leaves(out):
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in leaves(o)]
    return []


def poison(out) -> None:
    for t in leaves(out):
        t.fill_(float("nan") if t.is_floating_point() else -7)


def digest(out) -> str:
    import torch

    torch.cuda.synchronize()
    h = hashlib.sha256()
    for t in leaves(out):
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write(result: str, data: dict) -> None:
    Path(result).write_text(json.dumps(data, default=str))


def outcome(fn, result: str, **extra) -> None:
    """Run fn; record its return value or the FoundryError it raised (type and message)."""
    import foundry_core as fc

    try:
        data = fn() or {}
        data.setdefault("error", None)
    except fc.FoundryError as e:
        data = {"error": f"{type(e).__name__}: {e}"}
    data.update(extra)
    write(result, data)


# -- toy workload for the layout checks ------------------------------------------------------------------------
def toy_init(session, order: str, device: int, variant: str = "plain"):
    """Weights (3 x 16 MiB segments), a 2 MiB buffer (a 20 MiB segment) and two small tensors sharing a 2 MiB
    segment. "save" puts the buffer first, "reorder" after the weights (same total), "shift" adds 1 GiB first,
    "swap-small" swaps the two small tensors (same segments, other places inside one).
    variant "plain": elementwise/reductions only; "thread": the same with the weights made in another thread;
    "gemm": the bf16 GEMM toy of the first GPU run (diagnostic); "gemm-nn1" / "gemm-tn1": one GEMM of it,
    x @ w (NN) or F.linear (TN, the layout of model code)."""
    import torch

    def label(name):
        return session.label(name) if session is not None and session.arena is not None else _null()

    g = torch.Generator().manual_seed(5)
    t = {}
    if order == "shift":
        with label("extra 1 GiB"):
            t["extra"] = torch.empty(1 << 30, dtype=torch.uint8, device=device)

    def buffer():
        with label("buffer"):
            t["buf"] = (torch.arange(1 << 19, dtype=torch.float32, device=device) % 97) / 97.0  # 2 MiB

    def weights():
        with label("weights"):
            for i in range(3):
                if variant.startswith("gemm"):
                    t[f"w{i}"] = (torch.randn(HIDDEN * 4, HIDDEN * 2, generator=g) / 64).to(device, torch.bfloat16)
                else:
                    t[f"w{i}"] = (torch.randn(HIDDEN * 4, HIDDEN, generator=g) / 8).to(device)

    def small(names):
        with label("small tensors"):
            for name in names:
                n = {"s1": 1 << 16, "s2": 1 << 17}[name]  # 256 KiB and 512 KiB: one small-pool segment
                t[name] = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(device)

    if order == "reorder":
        weights()
        buffer()
    elif variant == "thread":  # the weights come from a thread the application starts during init
        import threading

        buffer()
        worker = threading.Thread(target=weights)
        worker.start()
        worker.join()
    else:
        buffer()
        weights()
    small(["s2", "s1"] if order == "swap-small" else ["s1", "s2"])
    width = HIDDEN * 4 if variant.startswith("gemm") else HIDDEN
    dt = torch.bfloat16 if variant.startswith("gemm") else torch.float32
    static_in = {bs: torch.zeros(bs, width, dtype=dt, device=device) for bs in TOY_BS}

    def forward(bs):
        x = static_in[bs]
        if variant == "gemm-nn1":
            return (x @ t["w0"]).float().sum(-1)
        if variant == "gemm-tn1":
            return torch.nn.functional.linear(x[:, : HIDDEN * 2], t["w0"]).float().sum(-1)
        if variant == "gemm":
            h = torch.relu(x @ t["w0"]) + t["buf"][: HIDDEN * 2].to(torch.bfloat16)
            h = (h @ t["w1"].T) * t["buf"][HIDDEN * 4: HIDDEN * 8].to(torch.bfloat16)
            return (h @ t["w2"]).float().sum(-1)
        h = x[:, None, :] * t["w0"][None, :64] + t["w1"][None, 64:128]
        h = torch.tanh(h) * t["w2"][None, -64:]
        return h.sum(-1) + t["buf"][:64] + t["s1"][:64] + t["s2"][-64:]

    return static_in, forward


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def toy_inputs(static_in, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    for bs in sorted(static_in):
        static_in[bs].copy_(torch.randn(static_in[bs].shape, generator=g).to(torch.bfloat16))


def child_toy_save(archive, result, variant="plain"):
    import foundry_core as fc

    s = fc.Session(archive, mode="save", key=KEY, progress=False).open()
    static_in, forward = toy_init(s, "save", s.device, variant)
    graphs = {}
    with s.capture_phase():
        for bs in TOY_BS:
            graphs[bs] = s.capture(f"decode_bs{bs}", lambda bs=bs: forward(bs))
    outs = {g.key: g.outputs for g in s.captured}
    try:
        s.save()
    except fc.FoundryError as e:
        write(result, {"error": f"{type(e).__name__}: {e}"})
        return
    hashes, again, values = {}, {}, {}
    for seed in SEEDS:
        toy_inputs(static_in, seed)
        for bs in TOY_BS:
            o = outs[f"decode_bs{bs}"]
            for into in (hashes, again):  # twice: is the live graph itself replay-to-replay deterministic?
                poison(o)
                graphs[bs].replay()
                into[f"{seed}/bs{bs}"] = digest(o)
            values[f"{seed}/bs{bs}"] = [float(v) for v in o.flatten()[:16].tolist()]
    write(result, {"hashes": hashes, "trace_records": s.arena.trace_len(), "error": None,
                   "deterministic": hashes == again, "values": values,
                   "stale_words": s.save_stats.get("stale_words") or 0})


def replay_restored_toy(restored, static_in) -> tuple[dict, dict]:
    """Replay each restored toy graph on every seed's inputs (outputs poisoned first): hashes and first values."""
    hashes, values = {}, {}
    for seed in SEEDS:
        toy_inputs(static_in, seed)
        for bs in TOY_BS:
            rg = restored[f"decode_bs{bs}"]
            poison(rg.outputs)
            rg.replay()
            hashes[f"{seed}/bs{bs}"] = digest(rg.outputs)
            values[f"{seed}/bs{bs}"] = [float(v) for v in rg.outputs.flatten()[:16].tolist()]
    return hashes, values


def child_toy_load(archive, result, order, variant="plain"):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=KEY, progress=False).open()
        static_in, _ = toy_init(s, order, s.device, variant)
        restored = s.restore()
        hashes, values = replay_restored_toy(restored, static_in)
        st = s.restore_stats
        return {"hashes": hashes, "values": values, "layout_ms": st.layout_seconds * 1e3,
                "layout_records": st.layout_records,
                "blocks_ms": st.blocks_seconds * 1e3, "blocks": st.layout_blocks}

    outcome(run, result)


def child_toy_auto(archive, result, order):
    """The built-in engine's / plugin's graph backend in auto mode: a LOAD problem falls back to live capture."""
    import torch

    import foundry_core as fc
    from foundry_sglang.graph_backend import FoundryGraphBackend

    backend = FoundryGraphBackend(fc.Session(archive, mode="auto", key=KEY, progress=False))
    backend.before_allocations()
    mode = backend.session.mode
    static_in, forward = toy_init(backend.session, order, backend.session.device)
    with backend.capture_session(torch.cuda.Stream()):
        for bs in TOY_BS:
            backend.capture_one(bs, lambda bs=bs: forward(bs))
    hashes = {}
    for seed in SEEDS:
        toy_inputs(static_in, seed)
        for bs in TOY_BS:
            o = backend._outputs[bs]
            poison(o)
            backend.replay(bs)
            hashes[f"{seed}/bs{bs}"] = digest(o)
    write(result, {"hashes": hashes, "session_mode": mode, "fallback_reason": backend.fallback_reason, "error": None})


# -- the bf16 GEMM toy diagnostic: which mechanism makes its restore differ ---------------------------------------
GEMM_VARIANTS = {
    # name: (toy variant, capture on one explicit stream also used for the warm-ups, extra SAVE/LOAD env)
    "base": ("gemm", False, {}),
    "explicit-stream": ("gemm", True, {}),
    "graph-pool-snapshot": ("gemm", False, {"FOUNDRY_SNAPSHOT_GRAPH_POOL": "1"}),
    "one-gemm-nn": ("gemm-nn1", False, {}),
    "one-gemm-tn": ("gemm-tn1", False, {}),
    "cublaslt": ("gemm", False, {"TORCH_BLAS_PREFER_CUBLASLT": "1"}),
    "no-workspace": ("gemm", False, {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}),
    # the fix for (b'), experimental: module variables the graphs point into are archived, relocated and filled
    "relocate": ("gemm", False, {"FOUNDRY_MODULE_GLOBALS": "relocate"}),
}


def diagnose(fn, default):
    """fn() for a diagnostic that must not sink the comparison it accompanies: on an exception, ``default`` with
    the error under "error" (a dict) or the default as is, and the traceback on stderr (the child's log)."""
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        return {**default, "error": f"{type(e).__name__}: {e}"[:200]} if isinstance(default, dict) else default


def function_identity(graph) -> dict[str, list]:
    """{kernel name: identity attributes (registers, static shared, const, local, max threads, binary/PTX
    version)} of the kernel nodes of a CUgraph, through the driver."""
    from foundry_core import images
    from foundry_core.codec import GraphReader
    from foundry_core.native import driver

    drv = driver()
    reader = GraphReader()
    dg = reader.read(graph)
    out = {}
    for f in dg.functions:
        attrs = images._func_attrs(drv, drv.CUfunction(f), images.IDENTITY_ATTRIBUTES)
        out.setdefault(reader.function_name(f), []).append([attrs.get(a) for a in images.IDENTITY_ATTRIBUTES])
    return out


def node_rows(archive: str) -> dict[str, list]:
    """Per graph of an archive: one row per node (kind, kernel name, grid, block, smem, argument bytes, launch
    attribute ids) and the edges with their data — what the rebuild is made from."""
    from foundry_core import restore, schema
    from foundry_core.archive import Archive

    a = Archive.open(archive)
    m = a.manifest
    arrays = restore.check_archive_for_load(a)
    out = {}
    for i, rec in enumerate(m.graphs):
        nodes, payload, attrs, edges = arrays[i]
        rows = []
        for n in nodes:
            kind = schema.NODE_KIND_NAMES[int(n["kind"])]
            name = m.functions[int(n["ref"])].name if int(n["kind"]) == schema.NODE_KERNEL else ""
            ids = [int(x) for x in attrs["id"][int(n["attr_off"]):int(n["attr_off"]) + int(n["attr_cnt"])]]
            rows.append([kind, name, n["grid"].tolist(), n["block"].tolist(), int(n["smem"]), int(n["payload_len"]),
                         ids])
        out[rec.key] = {"nodes": rows, "edges": [[int(e["src"]), int(e["dst"]), int(e["from_port"]),
                                                  int(e["to_port"]), int(e["type"])] for e in edges]}
    a.close()
    return out


def table_differences(tables, dg) -> dict[str, int]:
    """Node/edge fields in which a graph read back from the driver (``dg``, codec.DecodedGraph) differs from
    the archive tables it was rebuilt from (nodes, payload, attrs, edges)."""
    import numpy as np

    nodes, payload, attrs, edges = tables
    diff = {}
    if len(nodes) != len(dg.nodes) or len(edges) != len(dg.edges):
        return {"node/edge count": 1}
    for f in ("kind", "grid", "block", "smem", "payload_len"):
        diff[f] = int((nodes[f] != dg.nodes[f]).reshape(len(nodes), -1).any(axis=1).sum())
    pay = np.asarray(payload, np.uint8).tobytes()
    diff["arguments"] = sum(
        pay[int(a["payload_off"]):int(a["payload_off"]) + int(a["payload_len"])]
        != dg.payload[int(b["payload_off"]):int(b["payload_off"]) + int(b["payload_len"])]
        for a, b in zip(nodes, dg.nodes))

    def node_attrs(table, rec):
        lo, n = int(rec["attr_off"]), int(rec["attr_cnt"])
        return sorted((int(x["id"]), x["value"].tobytes()) for x in table[lo:lo + n])

    diff["launch attributes"] = sum(node_attrs(attrs, a) != node_attrs(dg.attrs, b) for a, b in zip(nodes, dg.nodes))
    key = ("src", "dst", "from_port", "to_port", "type")
    diff["edges"] = int(sum((np.sort(edges, order=key)[k] != np.sort(dg.edges, order=key)[k]).sum() for k in key))
    return {k: v for k, v in diff.items() if v}


def foreign_word_census(graph, arena_lo: int, arena_hi: int, recorded) -> dict:
    """Argument words of a live CUgraph outside the arena that look like addresses: how many the pointer check's
    driver query calls live memory, how many lie in module variables a library asked the driver for (recorded),
    and what cuMemGetAddressRange says about those (is module memory visible to allocation queries?)."""
    from foundry_core import modglobals
    from foundry_core.codec import GraphReader
    from foundry_core.native import driver
    from foundry_core.safety import PointerOracle, candidate_words

    drv = driver()
    reader = GraphReader()
    dg = reader.read(graph)
    spans = [(int(n["payload_off"]), int(n["payload_len"])) for n in dg.nodes if int(n["payload_len"])]
    words = candidate_words(dg.payload, spans, arena_lo, arena_hi)
    live = PointerOracle().foreign(words)
    refs = modglobals.argument_refs("g", dg.payload, [(i, o, n) for i, (o, n) in enumerate(spans)], recorded)
    ranges = {}
    for r in refs[:8]:
        err, base, size = drv.cuMemGetAddressRange(r.address)
        ranges[hex(r.address)] = f"{r.name[:50]}: " + (f"range {int(base):#x}+{int(size)}" if int(err) == 0
                                                       else getattr(err, "name", str(int(err))))
    return {"candidates": len(words), "live_per_driver_query": [hex(f.address) for f in live][:8],
            "in_module_variables": len(refs), "address_range": ranges}


def rebuild_here(archive: str, device: int) -> dict:
    """In the SAVE process: rebuild every graph of the archive from its tables with FRESH loads of its kernel
    images (what LOAD does), but with this process's memory and library state. {key: CUgraphExec} plus what
    keeps them alive."""
    import numpy as np
    import torch

    from foundry_core import images, restore
    from foundry_core.archive import Archive
    from foundry_core.native import native_lib
    from foundry_core.store import image_bytes

    a = Archive.open(archive)
    m = a.manifest
    modules = images.load_images([image_bytes(a, img) for img in m.images])
    funcs = np.asarray(images.get_functions(modules, m.functions), np.uint64)
    builder = restore.GraphBuilder(a, m, native_lib(), funcs, np.zeros(m.num_events, np.uint64))
    builder.arrays = restore.check_archive_for_load(a)
    stream = torch.cuda.Stream(device)
    execs = {}
    for i, rec in enumerate(m.graphs):
        if not rec.is_child:
            graph, _, _ = builder.build(i)
            execs[rec.key] = builder.instantiate(graph, stream.cuda_stream)
    stream.synchronize()
    return {"execs": execs, "keep": (a, modules, builder)}


def child_gemm_save(archive, result, name):
    """SAVE of one GEMM-toy variant, plus what tells the mechanisms apart (see check_gemm_toy)."""
    import torch

    import foundry_core as fc
    from foundry_core.native import native_lib
    from foundry_core.safety import PointerOracle

    variant, explicit, _ = GEMM_VARIANTS[name]

    def run():
        s = fc.Session(archive, mode="save", key=KEY, progress=False).open()
        static_in, forward = toy_init(s, "save", s.device, variant)
        graphs = {}
        stream = torch.cuda.Stream() if explicit else None
        with s.capture_phase():
            for bs in TOY_BS:
                if stream is not None:  # warm-ups and capture on the same stream: one cuBLAS workspace for both
                    with torch.cuda.stream(stream):
                        graphs[bs] = s.capture(f"decode_bs{bs}", lambda bs=bs: forward(bs), stream=stream)
                    torch.cuda.current_stream().wait_stream(stream)
                else:
                    graphs[bs] = s.capture(f"decode_bs{bs}", lambda bs=bs: forward(bs))
        outs = {g.key: g.outputs for g in s.captured}
        identity = {}
        for bs, g in graphs.items():
            identity.update(diagnose(lambda g=g: function_identity(g.raw_cuda_graph()), {}))
        recorded = s._recorder.globals() if s._recorder is not None else []
        oracle = PointerOracle()
        seen = diagnose(lambda: [g.name for g in recorded if oracle.owner(g.address) is not None], [])
        lo, hi = s.arena.base, s.arena.base + s.arena.size
        census = {f"decode_bs{bs}": diagnose(lambda g=g: foreign_word_census(g.raw_cuda_graph(), lo, hi, recorded),
                                             {"candidates": "?", "live_per_driver_query": [],
                                              "in_module_variables": "?", "address_range": {}})
                  for bs, g in graphs.items()}
        s.save()
        hashes, again, values = {}, {}, {}
        for seed in SEEDS:
            toy_inputs(static_in, seed)
            for bs in TOY_BS:
                o = outs[f"decode_bs{bs}"]
                for into in (hashes, again):
                    poison(o)
                    graphs[bs].replay()
                    into[f"{seed}/bs{bs}"] = digest(o)
                values[f"{seed}/bs{bs}"] = [float(v) for v in o.flatten()[:16].tolist()]
        inproc = {}
        try:  # the rebuild LOAD does, here: fresh module copies, this process's memory and library state
            rebuilt = rebuild_here(archive, s.device)
            lib = native_lib()
            for seed in SEEDS:
                toy_inputs(static_in, seed)
                for bs in TOY_BS:
                    o = outs[f"decode_bs{bs}"]
                    poison(o)
                    rc = lib.foundry_launch(rebuilt["execs"][f"decode_bs{bs}"], torch.cuda.current_stream().cuda_stream)
                    inproc[f"{seed}/bs{bs}"] = digest(o) if rc == 0 else f"launch rc {rc}"
            inproc_error = None
        except Exception as e:
            inproc_error = f"{type(e).__name__}: {e}"[:300]
        rows = diagnose(lambda: node_rows(archive), {})
        Path(result).with_suffix(".nodes.json").write_text(json.dumps(rows))
        tables = {k: v for k, v in rows.items() if isinstance(v, dict)}
        kernels = sorted({r[1] for g in tables.values() for r in g["nodes"] if r[1]}) or [rows.get("error", "?")]
        st = s.save_stats
        return {"hashes": hashes, "deterministic": hashes == again, "values": values, "inproc": inproc,
                "inproc_error": inproc_error, "identity": identity, "kernels": kernels,
                "nodes": {k: len(v["nodes"]) for k, v in tables.items()},
                "stale_words": st.get("stale_words") or 0,
                "module_globals": {"recorded": [[g.name, hex(g.address), g.size] for g in recorded],
                                   "oracle_sees": seen, "refs": st.get("module_global_refs"),
                                   "changed": st.get("module_globals_changed")},
                "graph_pool_snapshots": st.get("snapshots_graph_pool"), "foreign_words": census,
                "blas": str(torch.backends.cuda.preferred_blas_library())}

    outcome(run, result)


def child_gemm_load(archive, result, name, mode="plain"):
    """LOAD of one GEMM-toy variant. mode "cublas-warm": the toy's forward runs eagerly once after restore() and
    before the first replay (cuBLAS initialised, its modules loaded, as in a server that prefilled first)."""
    import foundry_core as fc
    from foundry_core.codec import GraphReader

    variant, _, _ = GEMM_VARIANTS[name]

    def run():
        import torch

        s = fc.Session(archive, mode="load", key=KEY, progress=False).open()
        static_in, forward = toy_init(s, "save", s.device, variant)
        restored = s.restore()
        s.wait_restored()
        if mode == "cublas-warm":
            for bs in TOY_BS:
                forward(bs)
            torch.cuda.synchronize()
        hashes, values = replay_restored_toy(restored, static_in)
        builder = s._restored.builder
        index = {rec.key: i for i, rec in enumerate(s.archive.manifest.graphs)}
        diffs, identity = {}, {}
        for key, rg in restored.items():
            if not rg._graph:
                diffs[key] = {"not rebuilt": 1}
                continue
            d = diagnose(lambda rg=rg, key=key: table_differences(builder.arrays[index[key]],
                                                                  GraphReader().read(rg._graph)), {})
            if d:
                diffs[key] = d
            identity.update(diagnose(lambda rg=rg: function_identity(rg._graph), {}))
        return {"hashes": hashes, "values": values, "rebuilt_vs_archive": diffs, "identity": identity}

    outcome(run, result)


def child_cost(records, result):
    """LOAD-side cost of the layout check on a real arena trace of ``records`` segment allocations."""
    import torch

    import foundry_core as fc
    from foundry_core import layout

    s = fc.Session(str(Path(result).with_suffix(".unused")), mode="save", key=KEY, record_images=False).open()
    keep = []
    t0 = time.perf_counter()
    while s.arena.trace_len() < int(records):
        keep.append(torch.empty(1 << 20, dtype=torch.uint8, device=s.device))  # small pool: 2 blocks / 2 MiB segment
    alloc_s = time.perf_counter() - t0
    rows = s.arena.trace()
    enc = layout.encode(rows, len(rows))
    t = time.perf_counter()
    dec = layout.decode(enc)
    decode_ms = (time.perf_counter() - t) * 1e3
    times = []
    for _ in range(30):
        t = time.perf_counter()
        live = s.arena.trace()  # what restore() does: read this process's trace back, compare
        layout.check(enc, dec, live, s.arena.granularity)
        times.append(time.perf_counter() - t)
    times.sort()
    bad = rows.copy()
    bad[len(bad) // 2]["granules"] += 1
    try:
        layout.check(enc, dec, bad, s.arena.granularity)
        msg = "no error"
    except fc.FoundryError as e:
        msg = str(e)
    blocks = layout.live_blocks(s._pools["init"], s.arena.base)
    enc = layout.encode(rows, len(rows), blocks=blocks)
    saved_blocks = layout.decode_blocks(enc)
    block_times = []
    for _ in range(5):
        t = time.perf_counter()
        layout.check_blocks(enc, saved_blocks, layout.live_blocks(s._pools["init"], s.arena.base), rows)
        block_times.append(time.perf_counter() - t)
    write(result, {"records": len(rows), "check_ms_median": times[len(times) // 2] * 1e3,
                   "check_ms_max": times[-1] * 1e3, "decode_ms": decode_ms, "alloc_s": alloc_s,
                   "manifest_bytes": len(enc.records), "mismatch": msg[:300], "blocks": len(blocks),
                   "blocks_ms_median": sorted(block_times)[2] * 1e3})
    del keep


# -- transformers' Qwen3 / Qwen3-MoE --------------------------------------------------------------------------------
def qwen_init(kind: str, device: int):
    import torch
    import transformers

    common = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "dense":
        cfg = transformers.Qwen3Config(intermediate_size=512, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                          norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
        cfg._experts_implementation = "batched_mm"  # index-select of expert weights: no host syncs, capturable
    cfg._attn_implementation = "sdpa"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    torch.manual_seed(1234)
    model = cls(cfg).to(device=device, dtype=torch.bfloat16).eval()
    caches, ids, pos, cpos, mask = {}, {}, {}, {}, {}
    for bs in QWEN_BS:
        cache = transformers.StaticCache(config=cfg, max_cache_len=QWEN_CACHE_LEN)
        if hasattr(cache, "early_initialization"):
            cache.early_initialization(batch_size=bs, num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                       dtype=torch.bfloat16, device=device)
        caches[bs] = cache
        ids[bs] = torch.zeros(bs, 1, dtype=torch.long, device=device)
        pos[bs] = torch.zeros(bs, 1, dtype=torch.long, device=device)
        cpos[bs] = torch.zeros(1, dtype=torch.long, device=device)
        mask[bs] = torch.zeros(bs, 1, 1, QWEN_CACHE_LEN, dtype=torch.bool, device=device)
        mask[bs][..., 0] = True

    def forward(bs):
        with torch.no_grad():
            out = model(input_ids=ids[bs], position_ids=pos[bs], cache_position=cpos[bs], attention_mask=mask[bs],
                        past_key_values=caches[bs], use_cache=True)
        return out.logits

    def set_step(bs, tokens, p):
        ids[bs].copy_(tokens.view(bs, 1))
        pos[bs].fill_(p)
        cpos[bs].fill_(p)
        mask[bs].zero_()
        mask[bs][..., : p + 1] = True

    def reset_cache(bs):
        for layer in caches[bs].layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    t.zero_()

    return forward, set_step, reset_cache, model


def qwen_steps(kind, run_graph, set_step, reset_cache):
    """Per input set and batch size: two successive decode steps (the second reads the KV the first wrote)."""
    import torch

    hashes = {}
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        p = 3 + seed % 17
        for bs in QWEN_BS:
            reset_cache(bs)
            tokens = torch.randint(0, 512, (bs,), generator=g)
            for step in range(2):
                set_step(bs, tokens.cuda(), p + step)
                logits = run_graph(bs)
                hashes[f"{seed}/bs{bs}/step{step}"] = digest(logits)
                tokens = logits[:, -1].float().argmax(-1).cpu()
    return hashes


def child_qwen_save(archive, result, kind):
    import torch

    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="save", key=f"{KEY}-{kind}", progress=False).open()
        forward, set_step, reset_cache, _ = qwen_init(kind, s.device)
        graphs = {}
        t0 = time.perf_counter()
        with s.capture_phase():
            for bs in QWEN_BS:
                graphs[bs] = s.capture(f"decode_bs{bs}", lambda bs=bs: forward(bs))
        capture_s = time.perf_counter() - t0
        outs = {g.key: g.outputs for g in s.captured}
        s.save()

        def run_graph(bs):
            poison(outs[f"decode_bs{bs}"])
            graphs[bs].replay()
            return outs[f"decode_bs{bs}"]

        hashes = qwen_steps(kind, run_graph, set_step, reset_cache)
        deterministic = True  # the same step replayed twice on the same state gives the same logits
        for bs in QWEN_BS:
            reset_cache(bs)
            set_step(bs, torch.arange(bs).cuda(), 4)
            first = digest(run_graph(bs))
            deterministic &= first == digest(run_graph(bs))
        return {"hashes": hashes, "deterministic": deterministic, "capture_s": capture_s,
                "stale_words": s.save_stats.get("stale_words") or 0, "archive_mb": os.path.getsize(archive) / 1e6}

    outcome(run, result)


def child_qwen_load(archive, result, kind):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=f"{KEY}-{kind}", progress=False).open()
        _, set_step, reset_cache, _ = qwen_init(kind, s.device)
        restored = s.restore()

        def run_graph(bs):
            rg = restored[f"decode_bs{bs}"]
            poison(rg.outputs)
            rg.replay()
            return rg.outputs

        hashes = qwen_steps(kind, run_graph, set_step, reset_cache)
        st = s.restore_stats
        return {"hashes": hashes, "nodes": st.num_nodes, "layout_ms": st.layout_seconds * 1e3,
                "layout_records": st.layout_records}

    outcome(run, result)


# -- random numbers inside graphs -------------------------------------------------------------------------------
RNG_BS = [8, 2]


def rng_init(device):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(9)
    w = (torch.randn(HIDDEN, HIDDEN, generator=g) / 32).to(device)
    x = {bs: torch.randn(bs, HIDDEN, generator=g).to(device) for bs in RNG_BS}

    def forward(bs):
        h = F.dropout(x[bs] @ w, p=0.3, training=True)
        n = torch.randn(bs, HIDDEN, device=device)
        return h + n, n

    return forward


def rng_stream(run_graph):
    import torch

    torch.cuda.manual_seed(2024)
    out = []
    for _ in range(5):
        for bs in RNG_BS:
            out.append(digest(run_graph(bs)))
    return out


def child_rng_save(archive, result):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="save", key=f"{KEY}-rng", progress=False).open()
        forward = rng_init(s.device)
        graphs = {}
        with s.capture_phase():
            for bs in RNG_BS:
                graphs[bs] = s.capture(f"rng_bs{bs}", lambda bs=bs: forward(bs))
        outs = {g.key: g.outputs for g in s.captured}
        s.save()

        def run_graph(bs):
            poison(outs[f"rng_bs{bs}"])
            graphs[bs].replay()
            return outs[f"rng_bs{bs}"]

        stream = rng_stream(run_graph)
        import torch

        from foundry_core.archive import Archive

        m = Archive.open(archive).manifest
        rng = {g.key: [(hex(r.seed_address), hex(r.offset_address), r.increment) for r in g.rng] for g in m.graphs}
        return {"stream": stream, "again": rng_stream(run_graph), "rng": rng,
                "offset_after": torch.cuda.default_generators[s.device].get_offset()}

    outcome(run, result)


def child_rng_load(archive, result):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=f"{KEY}-rng", progress=False).open()
        forward = rng_init(s.device)  # keeps the weights and inputs the graphs read alive (as SAVE does)
        restored = s.restore()

        def run_graph(bs):
            rg = restored[f"rng_bs{bs}"]
            poison(rg.outputs)
            rg.replay()
            return rg.outputs

        stream = rng_stream(run_graph)
        import torch

        del forward
        return {"stream": stream, "offset_after": torch.cuda.default_generators[s.device].get_offset()}

    outcome(run, result)


# -- pointer check ------------------------------------------------------------------------------------------------
KERNELS_CU = r"""
namespace at { namespace cuda { namespace detail {
// The layout of PyTorch's TensorInfo (ATen/cuda/detail/TensorInfo.cuh): slots at and beyond dims are never read.
template <typename T, typename IndexType> struct TensorInfo {
    T* data; IndexType sizes[25]; IndexType strides[25]; int dims;
};
}}}
template <typename T, typename I>
__global__ void scale_info(at::cuda::detail::TensorInfo<T, I> src, T* dst, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && i < (int)src.sizes[0]) dst[i] = src.data[i * src.strides[0]] * 2.0f + 1.0f;
}
template __global__ void scale_info<float, unsigned int>(
    at::cuda::detail::TensorInfo<float, unsigned int>, float*, int);

struct Args { const float* src; float* dst; int n; int used; const void* spare[4]; };
extern "C" __global__ void scale_struct(Args a) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < a.n) a.dst[i] = a.src[i] * 2.0f + 1.0f;
}
extern "C" __global__ void scale_ptr(const float* src, float* dst, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i] * 2.0f + 1.0f;
}
"""


def build_kernels(workdir: Path) -> bytes:
    src = workdir / "ptr_kernels.cu"
    src.write_text(KERNELS_CU)
    cubin = workdir / "ptr_kernels.cubin"
    subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-o", str(cubin), str(src)], check=True, capture_output=True)
    return cubin.read_bytes()


class RawKernels:
    """Kernels from a cubin loaded with cuModuleLoadData, launched with cuLaunchKernel on torch's stream."""

    def __init__(self, cubin: bytes):
        import ctypes

        from cuda.bindings import driver as drv

        self.drv, self.ctypes = drv, ctypes
        self._image = ctypes.create_string_buffer(cubin, len(cubin))
        err, self.module = drv.cuModuleLoadData(ctypes.addressof(self._image))
        assert int(err) == 0, err
        err, count = drv.cuModuleGetFunctionCount(self.module)
        assert int(err) == 0, err
        err, funcs = drv.cuModuleEnumerateFunctions(count, self.module)
        assert int(err) == 0, err
        self.fn = {}
        for f in funcs:
            err, name = drv.cuFuncGetName(f)
            for short in ("scale_info", "scale_struct", "scale_ptr"):
                if short.encode() in name:
                    self.fn[short] = f
        assert len(self.fn) == 3, self.fn
        self._keep = []

    def launch(self, name: str, n: int, src: int, dst: int, spare: int = 0, spare_slot: int = 1):
        """scale_info: TensorInfo{src, sizes[0]=n, strides[0]=1, dims=1} with ``spare`` in sizes[2*slot..];
        scale_struct: Args{src, dst, n, 2, spare[slot]=spare}; scale_ptr: (src, dst, n)."""
        import torch

        c = self.ctypes
        if name == "scale_info":
            class Info(c.Structure):
                _fields_ = [("data", c.c_uint64), ("sizes", c.c_uint32 * 25), ("strides", c.c_uint32 * 25),
                            ("dims", c.c_int32)]

            info = Info(src)
            info.sizes[0], info.strides[0], info.dims = n, 1, 1
            if spare:  # an 8-byte stale address over sizes[2k], sizes[2k+1] (8-aligned in the parameter)
                k = 2 * spare_slot
                info.sizes[k], info.sizes[k + 1] = spare & 0xFFFFFFFF, spare >> 32
            args = [info, c.c_uint64(dst), c.c_int(n)]
        elif name == "scale_struct":
            class Args(c.Structure):
                _fields_ = [("src", c.c_uint64), ("dst", c.c_uint64), ("n", c.c_int), ("used", c.c_int),
                            ("spare", c.c_uint64 * 4)]

            spares = [0, 0, 0, 0]
            spares[spare_slot] = spare
            args = [Args(src, dst, n, 2, (c.c_uint64 * 4)(*spares))]
        else:
            args = [c.c_uint64(src), c.c_uint64(dst), c.c_int(n)]
        params = (c.c_void_p * len(args))(*[c.addressof(a) for a in args])
        self._keep.append((args, params))
        stream = self.drv.CUstream(torch.cuda.current_stream().cuda_stream)
        err, = self.drv.cuLaunchKernel(self.fn[name], (n + 255) // 256, 1, 1, 256, 1, 1, 0, stream,
                                       c.addressof(params), 0)
        assert int(err) == 0, err


def foreign_device_memory(nbytes: int) -> int:
    """Device memory from the driver directly: live, outside the arena, not a PyTorch allocation."""
    from cuda.bindings import driver as drv

    err, ptr = drv.cuMemAlloc(nbytes)
    assert int(err) == 0, err
    return int(ptr)


def child_ptr(archive, result, case, cubin_path):
    """SAVE with one pointer situation; ``stale`` also records output hashes for the LOAD half."""
    import torch

    import foundry_core as fc
    from foundry_core.recorder import ImageRecorder

    pre_open = None
    if case == "pre-open-tensor":
        ImageRecorder().start()  # before CUDA work, as Session.open() would; open() then reuses it
        torch.cuda.init()
        pre_open = torch.randn(HIDDEN, device="cuda")  # before Session.open(): PyTorch's default pool
    s = fc.Session(archive, mode="save", key=f"{KEY}-ptr-{case}", progress=False).open()
    kernels = RawKernels(Path(cubin_path).read_bytes()) if case != "pre-open-tensor" else None
    x = torch.randn(HIDDEN, device=s.device)
    y = torch.zeros(HIDDEN, device=s.device)
    foreign = foreign_device_memory(1 << 20) if kernels else 0

    def forward():
        if case == "pre-open-tensor":
            return x * pre_open + 1
        if case == "foreign-whole-param":
            kernels.launch("scale_ptr", HIDDEN, foreign, y.data_ptr())
        elif case == "foreign-tensorinfo-data":  # the TensorInfo's data pointer is foreign: really used
            kernels.launch("scale_info", HIDDEN, foreign, y.data_ptr())
        elif case == "stale-tensorinfo":  # sizes[2..3] (unused, dims=1) hold a live foreign address
            kernels.launch("scale_info", HIDDEN, x.data_ptr(), y.data_ptr(), spare=foreign)
        elif case == "unknown-struct":  # spare[1] of a struct Foundry knows nothing about: cannot prove unused
            kernels.launch("scale_struct", HIDDEN, x.data_ptr(), y.data_ptr(), spare=foreign)
        return y

    def run():
        graph = None
        with s.capture_phase():
            graph = s.capture("g", forward, warmups=1)
        s.save()
        hashes = []
        for seed in SEEDS:
            x.copy_(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)).cuda())
            poison(y)
            graph.replay()
            hashes.append(digest(y))
        return {"hashes": hashes, "stale_words": s.save_stats.get("stale_words") or 0}

    outcome(run, result)


def child_ptr_load(archive, result, cubin_path):
    import torch

    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=f"{KEY}-ptr-stale-tensorinfo", progress=False).open()
        RawKernels(Path(cubin_path).read_bytes())  # same init as SAVE (module load allocates nothing in the arena)
        x = torch.randn(HIDDEN, device=s.device)
        y = torch.zeros(HIDDEN, device=s.device)  # kept alive: the graph writes it (LOAD checks live blocks)
        rg = s.restore()["g"]
        hashes = []
        for seed in SEEDS:
            x.copy_(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)).cuda())
            poison(rg.outputs)
            rg.replay()
            hashes.append(digest(rg.outputs))
        del y
        return {"hashes": hashes}

    outcome(run, result)


CHILDREN = {
    "toy-save": child_toy_save, "toy-load": child_toy_load, "toy-auto": child_toy_auto, "cost": child_cost,
    "qwen-save": child_qwen_save, "qwen-load": child_qwen_load, "rng-save": child_rng_save,
    "rng-load": child_rng_load, "ptr": child_ptr, "ptr-load": child_ptr_load, "gemm-save": child_gemm_save,
    "gemm-load": child_gemm_load,
}


# =====================================================================================================================
# orchestration
# =====================================================================================================================
class Runner:
    def __init__(self, out: Path, gpus: int):
        self.out = out
        self.gpus = max(gpus, 1)
        self._next = 0

    def child(self, tag: str, role: str, *args: str, timeout: int = 240, gpu: int | None = None,
              env: dict | None = None) -> dict:
        """Run one child (``env``: extra environment); returns its JSON result (or {"error": ...} describing how
        it failed)."""
        result = self.out / f"{tag}.json"
        result.unlink(missing_ok=True)
        if gpu is None:
            gpu, self._next = self._next % self.gpus, self._next + 1
        env = dict(os.environ, **(env or {}), CUDA_VISIBLE_DEVICES=str(gpu))
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", role, *args, str(result)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        (self.out / f"{tag}.log").write_text(f"rc={rc} {time.perf_counter() - t:.1f}s\n{text}")
        if result.exists():
            return json.loads(result.read_text())
        last = [ln for ln in str(text).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"child {role} rc={rc}: {last[0][:300]}", "crashed": True}


def check_layout(r: Runner) -> list[tuple[str, str, str]]:
    archive = str(r.out / "toy.foundry")
    rows = []
    with cf.ThreadPoolExecutor(2) as ex:
        saving = ex.submit(r.child, "toy-save", "toy-save", archive, "plain", gpu=0)
        thread = ex.submit(check_thread_toy, r)
        save = saving.result()
        if save.get("error"):
            return [("layout: SAVE of the toy workload", "FAIL", save["error"][:300]), *thread.result()]
        with cf.ThreadPoolExecutor(5) as ex2:
            orders = ("save", "reorder", "shift", "swap-small")
            fut = {o: ex2.submit(r.child, f"toy-load-{o}", "toy-load", archive, o, "plain", gpu=0) for o in orders}
            auto = ex2.submit(r.child, "toy-auto-reorder", "toy-auto", archive, "reorder", gpu=0)
            res = {o: f.result() for o, f in fut.items()}
            auto = auto.result()
        gemm_rows = thread.result()
    ok = res["save"]
    same = not ok.get("error") and ok["hashes"] == save["hashes"]
    rows.append(("layout: LOAD, same order -> bitwise", "PASS" if same else "FAIL",
                 ok.get("error") or f"{sum(ok['hashes'][k] == v for k, v in save['hashes'].items())}/"
                 f"{len(save['hashes'])} equal; checks: segments {ok['layout_ms']:.3f} ms ({ok['layout_records']} "
                 f"records), live blocks {ok['blocks_ms']:.3f} ms ({ok['blocks']} blocks)"))
    e = res["reorder"].get("error") or ""
    good = e.startswith("LayoutMismatch") and "allocation #" in e and '"buffer"' in e
    rows.append(("layout: reorder after weights -> refused, named", "PASS" if good else "FAIL",
                 e[:400] or "NOT refused"))
    reason = auto.get("fallback_reason") or ""
    fell_back = (not auto.get("error") and auto.get("session_mode") == "load" and "arena layout differs" in reason
                 and auto["hashes"] == save["hashes"])
    rows.append(("layout: auto (graph backend) falls back live", "PASS" if fell_back else "FAIL",
                 auto.get("error")
                 or f"live graphs == SAVE: {auto['hashes'] == save['hashes']}; reason: {reason[:160]}"))
    e = res["shift"].get("error") or ""
    rows.append(("layout: 1 GiB shift -> refused", "PASS" if e.startswith("LayoutMismatch") else "FAIL",
                 e[:300] or "NOT refused"))
    e = res["swap-small"].get("error") or ""
    rows.append(("layout: small tensors swapped in a segment -> refused",
                 "PASS" if e.startswith("LayoutMismatch") and "inside its segments" in e else "FAIL",
                 e[:300] or "NOT refused"))
    return rows + gemm_rows


def check_thread_toy(r: Runner) -> list[tuple[str, str, str]]:
    """Weights allocated by another thread during init: routed to the arena (outside it, SAVE would refuse them
    as foreign tensors), covered by the trace, restored bitwise."""
    archive = str(r.out / "toy-thread.foundry")
    save = r.child("toy-thread-save", "toy-save", archive, "thread", gpu=1 % r.gpus)
    if save.get("error"):
        return [("layout: weights made in another thread", "FAIL", "SAVE: " + save["error"][:300])]
    load = r.child("toy-thread-load", "toy-load", archive, "save", "thread", gpu=1 % r.gpus)
    if load.get("error"):
        return [("layout: weights made in another thread", "FAIL", "LOAD: " + load["error"][:300])]
    eq = sum(load["hashes"][k] == v for k, v in save["hashes"].items())
    good = eq == len(save["hashes"]) and save["trace_records"] >= 4
    return [("layout: weights made in another thread", "PASS" if good else "FAIL",
             f"trace {save['trace_records']} records, LOAD {eq}/{len(save['hashes'])} bitwise")]


def check_gemm_toy(r: Runner) -> list[tuple[str, str, str]]:
    """The bf16 GEMM toy whose restore differed from SAVE (0/6 bitwise, no error) on the H200, in variants that
    tell the candidate mechanisms apart (docs/FIDELITY.md "The bf16 GEMM toy"):

    * base: as the first runs (warm-ups on the current stream, capture on torch's side stream); its SAVE child
      also rebuilds the graphs IN ITS OWN PROCESS from the archive with fresh module copies ("in-process"),
      reports which module variables a library asked the driver for (and whether the pointer check's driver
      query sees them), the kernels and per-node tables (toy-gemm-base-save.nodes.json), and kernel identity;
      its LOAD child reads the rebuilt graphs back and compares them with the archive tables (attributes,
      edges, arguments) and kernel identity with SAVE's;
    * base, LOAD with cuBLAS warmed (the forward run eagerly once after restore(), before the first replay);
    * explicit-stream: warm-ups and capture on one stream (the engine's way: one cuBLAS workspace, allocated in
      the warm-up pool and snapshotted);
    * graph-pool-snapshot: FOUNDRY_SNAPSHOT_GRAPH_POOL=1 (live graph-pool blocks the arguments point into, e.g.
      the capture stream's cuBLAS workspace, are snapshotted and written back);
    * one-gemm-nn / one-gemm-tn: a single x @ w (NN) or F.linear (TN) GEMM;
    * cublaslt: TORCH_BLAS_PREFER_CUBLASLT=1; no-workspace: CUBLAS_WORKSPACE_CONFIG=:0:0;
    * relocate: FOUNDRY_MODULE_GLOBALS=relocate (experimental fix for (b'): the module variables arguments point
      into are archived with their image, filled and relocated at LOAD).

    A variant row FAILs when LOAD differs from a deterministic SAVE (wrong results are never acceptable); the
    last row (info) says which hypothesis the results leave standing."""
    jobs = {}
    with cf.ThreadPoolExecutor(4) as ex:
        for name, (_, _, env) in GEMM_VARIANTS.items():
            jobs[name] = ex.submit(_gemm_variant, r, name, env)
        res = {name: f.result() for name, f in jobs.items()}
    rows = []
    for name, (save, loads) in res.items():
        for mode, load in loads.items():
            label = name + ("" if mode == "plain" else f", LOAD {mode}")
            rows.append(_gemm_row(label, save, load))
    rows.append(("bf16 GEMM toy - diagnosis", "info", gemm_diagnosis(res)))
    return rows


def _gemm_variant(r: Runner, name: str, env: dict) -> tuple[dict, dict]:
    archive = str(r.out / f"toy-gemm-{name}.foundry")
    gpu = 1 % r.gpus
    save = r.child(f"toy-gemm-{name}-save", "gemm-save", archive, name, gpu=gpu, env=env)
    if save.get("error"):
        return save, {}
    modes = ("plain", "cublas-warm") if name == "base" else ("plain",)
    return save, {m: r.child(f"toy-gemm-{name}-load-{m}", "gemm-load", archive, name, m, gpu=gpu, env=env)
                  for m in modes}


def _equal(save: dict, got: dict) -> int:
    return sum(got.get(k) == v for k, v in save.get("hashes", {}).items())


def _gemm_row(label: str, save: dict, load: dict | None) -> tuple[str, str, str]:
    name = f"bf16 GEMM toy (split-K, PDL edge) [{label}]"
    if save.get("error"):  # a refusal (FoundryError) is a verdict of its own; a crashed child is a broken check
        return name, "FAIL" if save.get("crashed") else "info", "SAVE: " + save["error"][:300]
    if load is None or load.get("error"):
        return name, "FAIL", "LOAD: " + (load or {}).get("error", "not run")[:300]
    n = len(save["hashes"])
    eq = _equal(save, load["hashes"])
    diff = max((abs(a - b) for k in save["values"] for a, b in zip(save["values"][k], load["values"][k])),
               default=0.0)
    mg = save["module_globals"]
    detail = (f"LOAD {eq}/{n} bitwise (max |diff| {diff:.3g}); in-process rebuild "
              f"{_equal(save, save['inproc'])}/{n}{' (' + save['inproc_error'] + ')' if save['inproc_error'] else ''}"
              f"; live deterministic {save['deterministic']}; nodes {save['nodes']}; kernels "
              f"{[k[:40] for k in save['kernels']]}; module variables asked for {len(mg['recorded'])} (driver "
              f"query sees {len(mg['oracle_sees'])}), argument refs {mg['refs']}, changed {mg['changed']}; "
              f"graph-pool snapshots {save['graph_pool_snapshots']}; foreign argument words "
              f"{_census(save.get('foreign_words', {}))}; rebuilt vs archive "
              f"{load['rebuilt_vs_archive'] or 'identical'}; kernel identity differs for "
              f"{sorted(k for k in save['identity'] if load['identity'].get(k) != save['identity'][k])[:4]}")
    if not save["deterministic"]:
        return name, "info", detail
    return name, "PASS" if eq == n else "FAIL", detail


def _census(census: dict) -> str:
    return ", ".join(f"{k}: {v['candidates']} (driver: {len(v['live_per_driver_query'])} live, "
                     f"{v['in_module_variables']} in module variables {v['address_range'] or ''})"
                     for k, v in census.items()) or "?"


def gemm_diagnosis(res: dict) -> str:
    """What the variant results leave standing (see docs/FIDELITY.md for the hypotheses)."""
    def ok(name, mode="plain"):
        save, loads = res.get(name, ({}, {}))
        load = loads.get(mode)
        if save.get("error") or not load or load.get("error"):
            return None
        return _equal(save, load["hashes"]) == len(save["hashes"])

    base, _ = res.get("base", ({}, {}))
    if base.get("error"):
        return "base SAVE failed: " + base["error"][:200]
    if ok("base"):
        return "base restores bitwise: nothing to diagnose"
    out = []
    inproc = _equal(base, base.get("inproc", {})) == len(base.get("hashes", {}))
    if inproc:
        out.append("in-process rebuild (fresh module copies, SAVE's memory) is bitwise: tables, attributes, edges "
                   "and images are right; the fresh process lacks state the graphs read")
        if ok("base", "cublas-warm"):
            out.append("LOAD is right once cuBLAS ran eagerly -> (b') the graphs depend on cuBLAS's own module "
                       f"memory/state (module-variable argument refs at SAVE: {base['module_globals']['refs']})")
        if ok("graph-pool-snapshot"):
            out.append("snapshotting graph-pool blocks fixes it -> (a) state in memory the capture allocated "
                       "(cuBLAS workspace of the capture stream)")
        if ok("explicit-stream"):
            out.append("warming up on the capture stream fixes it -> (a)/(e) the capture stream's own workspace")
        if ok("relocate"):
            out.append("FOUNDRY_MODULE_GLOBALS=relocate fixes it -> (b') confirmed, and the relocation works")
    else:
        out.append(f"in-process rebuild differs too ({base.get('inproc_error') or 'wrong results'}) -> the rebuild or "
                   "the fresh module copies: see the LOAD rows' 'rebuilt vs archive' (c) and 'kernel identity' (d), "
                   f"and changed module variables (b): {base['module_globals']['changed']}")
    fine = [n for n in GEMM_VARIANTS if ok(n)]
    out.append(f"variants that restore bitwise: {fine or 'none'}")
    return "; ".join(out)


def check_cost(r: Runner) -> list[tuple[str, str, str]]:
    res = r.child("cost", "cost", "10000", timeout=240)
    if res.get("error"):
        return [("layout: LOAD check cost, 10,000 records", "FAIL", res["error"])]
    good = res["check_ms_median"] <= 1.0 and res["records"] >= 10000 and "allocation #" in res["mismatch"]
    return [("layout: LOAD check cost, 10,000 records", "PASS" if good else "FAIL",
             f"{res['records']} segment records: read back + compare {res['check_ms_median']:.3f} ms median "
             f"({res['check_ms_max']:.3f} max); decode at open {res['decode_ms']:.3f} ms; "
             f"{res['manifest_bytes'] / 1e3:.1f} kB in the manifest; live-block check "
             f"{res['blocks_ms_median']:.1f} ms for {res['blocks']} blocks")]


def check_qwen(r: Runner, kind: str) -> list[tuple[str, str, str]]:
    name = f"transformers Qwen3{'-MoE' if kind == 'moe' else ''} decode, bs {QWEN_BS}"
    archive = str(r.out / f"qwen-{kind}.foundry")
    gpu = 0 if kind == "dense" else 1 % r.gpus
    save = r.child(f"qwen-{kind}-save", "qwen-save", archive, kind, timeout=300, gpu=gpu)
    if save.get("error"):
        return [(name, "FAIL", "SAVE: " + save["error"][:400])]
    load = r.child(f"qwen-{kind}-load", "qwen-load", archive, kind, timeout=300, gpu=gpu)
    if load.get("error"):
        return [(name, "FAIL", "LOAD: " + load["error"][:400])]
    eq = sum(load["hashes"][k] == v for k, v in save["hashes"].items())
    good = eq == len(save["hashes"]) and len(save["hashes"]) == len(SEEDS) * len(QWEN_BS) * 2
    return [(name, "PASS" if good else "FAIL",
             f"{eq}/{len(save['hashes'])} (input sets x bs x 2 steps) bitwise; SAVE deterministic "
             f"{save['deterministic']}; {load['nodes']} nodes; stale words ignored {save['stale_words']:.0f}; "
             f"layout check {load['layout_ms']:.3f} ms / {load['layout_records']} records")]


def check_rng(r: Runner) -> list[tuple[str, str, str]]:
    archive = str(r.out / "rng.foundry")
    save = r.child("rng-save", "rng-save", archive, gpu=1 % r.gpus)
    if save.get("error"):
        return [("RNG: dropout + randn, 5 replays", "FAIL", "SAVE: " + save["error"][:400])]
    load = r.child("rng-load", "rng-load", archive, gpu=1 % r.gpus)
    if load.get("error"):
        return [("RNG: dropout + randn, 5 replays", "FAIL", "LOAD: " + load["error"][:400])]
    live, rest = save["stream"], load["stream"]
    varies = len(set(live)) == len(live)
    good = live == rest and varies and save["again"] == live and save["offset_after"] == load["offset_after"]
    return [("RNG: dropout + randn, restored == live (5 replays)", "PASS" if good else "FAIL",
             f"{sum(a == b for a, b in zip(live, rest))}/{len(live)} replays equal (2 graphs x 5); live draws all "
             f"distinct {varies}; generator offset after: live {save['offset_after']} / restored "
             f"{load['offset_after']}; state {save['rng']}")]


def check_pointers(r: Runner) -> list[tuple[str, str, str]]:
    rows = []
    cubin = r.out / "ptr_kernels.cubin"
    try:
        build_kernels(r.out)
    except Exception as e:  # nvcc missing or failing: only the PyTorch row can run
        cubin = None
        rows.append(("pointer check: raw kernels", "FAIL", f"nvcc: {e}"[:300]))
    refusals = [("pre-open-tensor", "pre-open tensor (elementwise) -> refused", "inside a struct"),
                ("foreign-whole-param", "foreign whole parameter -> refused", "whole pointer-sized"),
                ("foreign-tensorinfo-data", "foreign TensorInfo.data -> refused", "inside a struct"),
                ("unknown-struct", "foreign in unknown struct bytes -> refused", "inside a struct")]
    cases = [c for c in refusals if cubin is not None or c[0] == "pre-open-tensor"]
    with cf.ThreadPoolExecutor(len(cases) + 1) as ex:
        futs = [ex.submit(r.child, f"ptr-{c}", "ptr", str(r.out / f"ptr-{c}.foundry"), c, str(cubin or "-"))
                for c, _, _ in cases]
        stale = (ex.submit(r.child, "ptr-stale", "ptr", str(r.out / "ptr-stale.foundry"), "stale-tensorinfo",
                           str(cubin)) if cubin is not None else None)
        for (case, title, rule), fut in zip(cases, futs):
            e = fut.result().get("error") or ""
            good = e.startswith("UnsafeAddress") and rule in e
            rows.append((f"pointer: {title}", "PASS" if good else "FAIL", e[:300] or "NOT refused"))
        if stale is None:
            return rows
        save = stale.result()
    if save.get("error"):
        rows.append(("pointer: stale in TensorInfo unused slots -> saved", "FAIL",
                     "SAVE: " + save["error"][:300]))
        return rows
    load = r.child("ptr-stale-load", "ptr-load", str(r.out / "ptr-stale.foundry"), str(cubin))
    good = not load.get("error") and load["hashes"] == save["hashes"] and save["stale_words"] >= 1
    rows.append(("pointer: stale in TensorInfo unused slots -> saved", "PASS" if good else "FAIL",
                 load.get("error") or f"saved ({save['stale_words']:.0f} stale word ignored), LOAD "
                 f"{sum(a == b for a, b in zip(load['hashes'], save['hashes']))}/{len(save['hashes'])} bitwise"))
    return rows


def check_core(r: Runner) -> list[tuple[str, str, str]]:
    out = r.out / "core"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(1 % r.gpus))
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu/check_core.py"), "--out", str(out)], env=env,
                              capture_output=True, text=True, timeout=420)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        return [("tests/gpu/check_core.py", "FAIL", f"timeout after {e.timeout}s")]
    (r.out / "check_core.out").write_text(text)
    table = [ln for ln in text.splitlines() if " | " in ln]
    verdicts = [ln.split("|")[0].strip() for ln in table]
    good = proc.returncode == 0 and verdicts.count("PASS") >= 4 and "FAIL" not in verdicts
    return [("tests/gpu/check_core.py still passes", "PASS" if good else "FAIL",
             f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL: " + " / ".join(
                 ln.split("|")[1].strip() + "=" + ln.split("|")[0].strip() for ln in table if ln))]


CHECKS = {  # longest first: they all run at once by default
    "core": check_core, "gemm": check_gemm_toy, "pointers": check_pointers, "qwen-moe": lambda r: check_qwen(r, "moe"),
    "qwen-dense": lambda r: check_qwen(r, "dense"), "layout": check_layout, "rng": check_rng, "cost": check_cost,
}
ORDER = ["layout", "gemm", "cost", "qwen-dense", "qwen-moe", "rng", "pointers", "core"]  # rows in the table


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        import logging

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        CHILDREN[sys.argv[2]](*_child_args(sys.argv[3:]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/foundry-fidelity"), help="folder for logs/archives")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--jobs", type=int, default=len(CHECKS), help="checks run at the same time")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        gpus = len([ln for ln in listing.splitlines() if ln.startswith("GPU")])
    except OSError:
        gpus = 1
    r = Runner(out, gpus)
    names = [n for n in (a.only.split(",") if a.only else CHECKS) if n]
    t0 = time.perf_counter()
    results: dict[str, list] = {}

    def run(name):
        t = time.perf_counter()
        try:
            rows = CHECKS[name](r)
        except Exception as e:  # a broken check prints its row; the others still run
            (out / f"{name}.error").write_text(traceback.format_exc())
            rows = [(name, "FAIL", f"{type(e).__name__}: {e}"[:300])]
        print(f"[{time.perf_counter() - t0:6.1f}s] {name} done in {time.perf_counter() - t:.1f}s", flush=True)
        return rows

    with cf.ThreadPoolExecutor(max(a.jobs, 1)) as ex:
        futures = {n: ex.submit(run, n) for n in names}
        for n in names:
            results[n] = futures[n].result()
    rows = [row for n in sorted(names, key=ORDER.index) for row in results[n]]
    (out / "verdicts.json").write_text(json.dumps(rows, indent=1))
    print(f"\n=== foundry fidelity GPU check ({time.perf_counter() - t0:.0f}s, {gpus} GPU(s)) ===")
    for name, verdict, detail in rows:
        print(f"{verdict:4} | {name:52} | {detail}")
    sys.exit(0 if all(v in ("PASS", "info") for _, v, _ in rows) else 1)


def _child_args(args: list[str]) -> list[str]:
    """Children take their positional args with the result path last; reorder to the functions' signatures."""
    *rest, result = args
    if not rest:
        return [result]
    return [rest[0], result, *rest[1:]]


if __name__ == "__main__":
    main()
