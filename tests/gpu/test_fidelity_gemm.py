"""Fidelity: the bf16 GEMM toy (cuBLASLt split-K GEMMs whose kernels a programmatic/PDL edge links) restores
bitwise in every variant. It restored to garbage until edges with edge data were added one per driver call
(docs/FIDELITY.md "The bf16 GEMM toy"); the variants and the last row tell the mechanisms apart if it ever fails
again. The pure parts (table comparison, rows, diagnosis) are tested on CPU: tests/core/test_gemm_diagnostic.py.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import traceback
from pathlib import Path

import pytest

from gpu.bitwise import digest, equal_count, poison
from gpu.fidelity import KEY, SEEDS, TOY_BS, Runner, outcome, replay_restored_toy, toy_init, toy_inputs

pytestmark = pytest.mark.gpu


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
        for mode, load in (loads or {"plain": None}).items():  # a failed SAVE has a row too
            label = name + ("" if mode == "plain" else f", LOAD {mode}")
            rows.append(_gemm_row(label, save, load))
    rows.append(("bf16 GEMM toy - diagnosis", "info", gemm_diagnosis(res)))
    return rows


def _gemm_variant(r: Runner, name: str, env: dict) -> tuple[dict, dict]:
    archive = str(r.out / f"toy-gemm-{name}.foundry")
    gpu = 1 % r.gpus
    save = r.child(f"toy-gemm-{name}-save", child_gemm_save, archive, name, gpu=gpu, env=env)
    if save.get("error"):
        return save, {}
    modes = ("plain", "cublas-warm") if name == "base" else ("plain",)
    return save, {m: r.child(f"toy-gemm-{name}-load-{m}", child_gemm_load, archive, name, m, gpu=gpu, env=env)
                  for m in modes}


def _equal(save: dict, got: dict) -> int:
    return equal_count(save.get("hashes", {}), got)


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


def test_gemm_toy_restores_bitwise(fidelity, verdicts):
    fidelity(check_gemm_toy)
    verdicts.assert_passed()
