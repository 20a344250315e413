"""SAVE: turn recorded graphs into an archive.

:func:`write_archive` reads only its :class:`SaveInputs` (``Session.save()`` gathers them).

Steps: read every graph (codec), give kernels, events and child graphs archive-wide indices, map kernels to
the module images they came from (images), refuse arguments that point outside restorable memory (safety),
find the graph-safe RNG state graphs read, snapshot the warm-up buffers graphs read, share structure between
graphs (templates), write blobs + manifest with the arena's allocation trace (layout).
"""
from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from foundry_core import cubin, layout, modglobals, schema, trust
from foundry_core import images as kernel_images
from foundry_core.archive import ArchiveWriter
from foundry_core.codec import DecodedGraph, GraphReader, template_identity
from foundry_core.errors import UnsafeAddress, UnsupportedGraph
from foundry_core.fingerprint import current_fingerprint
from foundry_core.native import call, driver, native_lib
from foundry_core.options import ENV, Options
from foundry_core.outputs import flatten_outputs, tensor_at
from foundry_core.safety import PointerOracle, candidate_words, judge_graph, padding_ranges, whole_word_params
from foundry_core.store import store_images

__all__ = ["CapturedGraph", "SaveInputs", "snapshot_facts", "write_archive"]

log = logging.getLogger("foundry_core.save")

SNAPSHOT_SMALL_BYTES = 1 << 20


class CapturedGraph(NamedTuple):
    """One graph recorded for SAVE."""

    key: str
    graph: Any  # torch.cuda.CUDAGraph made with keep_graph=True (its CUgraph is read)
    outputs: Any  # tensor or pytree of tensors
    capture_seconds: float = 0.0


@dataclass
class SaveInputs:
    """Everything SAVE reads: the recorded graphs and what the process knew while making them."""

    path: Path
    key: str  # the caller's identity, stored in the fingerprint
    device: int
    arena: Any  # allocator.Arena
    graphs: Sequence[CapturedGraph]
    images: Any  # recorder.ImageRecorder that ran since open()
    capture_range: tuple[int, int]  # arena offsets of the capture phase
    warmup_pool: Any  # torch.cuda.MemPool of the capture phase (live blocks graphs may read are snapshotted)
    trace_at_capture: int  # arena trace records before the capture phase (LOAD must reproduce them)
    blocks_at_capture: Any  # live blocks of the init pool when the capture phase began (layout.live_blocks)
    labels: Sequence[tuple[str, int, int]] = ()  # (name, first trace record, end) from Session.label()
    capture_begin_blocks: frozenset = frozenset()  # (address, size) blocks torch allocated in capture_begin
    slots: Optional[Any] = None  # slots.SlotRecorder, when placeholders were launched
    image_store: Optional[Any] = None  # store.ImageStore for the kernel images; None: embedded in the archive
    extra: Mapping[str, str] = field(default_factory=dict)
    progress: bool = True  # tqdm while reading graphs
    #: torch.cuda.MemPool the graphs were captured into; with ``options.snapshot_graph_pool`` its live blocks that
    #: arguments point into (and that hold no graph output) are snapshotted too — e.g. a cuBLAS workspace
    #: PyTorch allocated during capture for the capture stream
    graph_pool: Optional[Any] = None
    #: the session's settings: module-variable policy, foreign pointers, graph-pool snapshots, the signing key
    options: Options = field(default_factory=Options)


@dataclass
class _Entry:
    key: str
    graph: DecodedGraph
    is_child: bool
    outputs: Any
    capture_seconds: float
    child_indices: list[int]


def _kernel_and_copy_spans(g: DecodedGraph) -> list[tuple[int, int, int]]:
    """(node, payload offset, length) of every node whose payload may hold device addresses."""
    sel = np.nonzero(g.nodes["payload_len"])[0]
    return [(int(i), int(g.nodes[i]["payload_off"]), int(g.nodes[i]["payload_len"])) for i in sel]


def write_archive(inputs: SaveInputs, stats: dict[str, float]) -> Path:
    """Read, check and write ``inputs``' graphs; returns the archive path. ``stats`` receives timings (seconds)
    and sizes."""
    import torch

    torch.cuda.synchronize()
    arena = inputs.arena
    t0 = time.perf_counter()

    # 1. read graphs ----------------------------------------------------------------------------------------
    slot_recorder = inputs.slots
    reader = GraphReader(slot_function=slot_recorder.function if slot_recorder is not None else None)
    reader.memcpy3d_size = int(native_lib(inputs.options).foundry_sizeof_memcpy3d())
    entries: list[_Entry] = []

    def add(key, dg, is_child, outputs, secs) -> int:
        children = [add(f"{key}/child{i}", c, True, None, 0.0) for i, c in enumerate(dg.children)]
        entries.append(_Entry(key, dg, is_child, outputs, secs, children))
        return len(entries) - 1

    graphs = inputs.graphs
    iterator = graphs
    if inputs.progress:
        from tqdm import tqdm

        iterator = tqdm(graphs, desc="foundry: reading graphs", unit="graph", leave=False)
    for key, g, outputs, secs in iterator:
        add(key, reader.read(g.raw_cuda_graph(), key), False, outputs, secs)
    stats["read_seconds"] = time.perf_counter() - t0

    slots = _referenced_slots(entries, slot_recorder)

    # 2. archive-wide tables --------------------------------------------------------------------------------
    handles: list[int] = []
    handle_index: dict[int, int] = {}
    events: dict[int, int] = {}
    for e in entries:
        for h in e.graph.functions:
            if h not in handle_index:
                handle_index[h] = len(handles)
                handles.append(h)
        for ev in e.graph.events:
            events.setdefault(ev, len(events))
    t1 = time.perf_counter()
    images = inputs.images.images()
    refs = kernel_images.resolve_functions(handles, images, inputs.images.module_images())
    stored_images, functions = kernel_images.select_images(images, refs)
    function_of = {(stored_images[f.image].sha256, f.name): i for i, f in enumerate(functions)}
    global_ref = [function_of[(r.sha256, r.name)] for r in refs]  # per handle index
    stats["resolve_seconds"] = time.perf_counter() - t1

    for e in entries:
        nodes = e.graph.nodes
        kinds = nodes["kind"]
        local = nodes["ref"].copy()
        k = kinds == schema.NODE_KERNEL
        nodes["ref"][k] = [global_ref[handle_index[e.graph.functions[i]]] for i in local[k]]
        ev = (kinds == schema.NODE_EVENT_RECORD) | (kinds == schema.NODE_EVENT_WAIT)
        nodes["ref"][ev] = [events[e.graph.events[i]] for i in local[ev]]
        ch = kinds == schema.NODE_CHILD_GRAPH
        nodes["ref"][ch] = [e.child_indices[i] for i in local[ch]]

    # 3. safety: arguments must point into restorable memory ------------------------------------------------
    t2 = time.perf_counter()
    relocating = inputs.options.module_globals == "relocate"
    recorded_globals = inputs.images.globals() if relocating and hasattr(inputs.images, "globals") else []
    lo, hi = arena.base, arena.base + arena.size
    oracle = PointerOracle()
    allow = inputs.options.allow_foreign_pointers
    layouts = {global_ref[handle_index[h]]: reader.param_layout(h) for h in handles}
    pointer_params = {f: whole_word_params(layout_) for f, layout_ in layouts.items()}
    stale = 0
    arena_words = []
    for e in entries:
        spans = _kernel_and_copy_spans(e.graph)
        foreign = oracle.foreign(candidate_words(e.graph.payload, [(o, n) for _, o, n in spans], lo, hi))
        if relocating:  # words into recorded module variables are relocated at LOAD, not refused here
            foreign = [f for f in foreign if not modglobals.inside_any(f.address, recorded_globals)]
        if foreign:
            nodes = e.graph.nodes

            def kernel_info(i, args, nodes=nodes):
                if int(nodes[i]["kind"]) != schema.NODE_KERNEL:
                    return None
                f = int(nodes[i]["ref"])
                return pointer_params[f], padding_ranges(functions[f].name, layouts[f], args)

            verdicts = judge_graph(e.graph.payload, spans, {f.address: f.owner for f in foreign}, kernel_info)
            refused = [v for v in verdicts if v.refused]
            stale += len(verdicts) - len(refused)
            if refused:
                bad = refused[0]
                msg = (f"graph {e.key!r}: node {bad.node} ({_node_name(e.graph, bad.node, functions)}) takes address "
                       f"{bad.address:#x} as {bad.rule} (argument byte {bad.offset}), {bad.owner}; LOAD would not "
                       f"restore it ({len(refused)} such use(s)). Allocate it with PyTorch after Session.open(); "
                       "memory a library allocates by itself cannot be restored")
                if not allow:
                    raise UnsafeAddress(msg)
                log.warning("%s (allowed by %s=1)", msg, ENV["allow_foreign_pointers"])
        for _, off, n in spans:
            w = np.frombuffer(e.graph.payload, "<u8", count=n // 8, offset=off)
            arena_words.append(w[(w >= lo) & (w < hi)])
    words = np.unique(np.concatenate(arena_words)) if arena_words else np.zeros(0, np.uint64)
    for spec in slots:
        for what, addr, size in (("send", spec.send, spec.send_bytes), ("recv", spec.recv, spec.recv_bytes)):
            if size and not (lo <= addr and addr + size <= hi):
                raise UnsafeAddress(f"slot {spec.id} ({spec.op}): its {what} buffer {addr:#x} is outside the arena")
    if stale:
        log.info("foundry: %d argument word(s) in unused slots of PyTorch TensorInfo/OffsetCalculator parameters "
                 "hold stale addresses of memory outside the arena; never read by their kernels, ignored", stale)
    stats["stale_words"] = float(stale)
    stats["safety_seconds"] = time.perf_counter() - t2

    # 3a. module variables: addresses a library passes to kernels, values changed since their module loaded ---
    t3 = time.perf_counter()
    relocations = _check_module_globals(inputs, entries, handles, refs, stored_images, functions, stats)
    stats["module_globals_seconds"] = time.perf_counter() - t3

    # 3b. graph-safe RNG state: found through the blocks PyTorch allocated in capture_begin ------------------
    rng_of = _find_rng_states(inputs, entries, words)

    # 4. snapshots of live warm-up buffers ----------------------------------------------------------------
    snapshots = _snapshot_blocks(inputs, words, _output_addresses(entries))
    stats["snapshots_graph_pool"] = float(sum(note == "graph pool" for _, _, note in snapshots))

    # 5. outputs, templates, blobs --------------------------------------------------------------------------
    start, end = inputs.capture_range
    fingerprint = current_fingerprint(inputs.key, inputs.device)
    for sha, data, *_ in relocations:  # images of relocated variables that no graph kernel comes from
        if sha not in {im.sha256 for im in stored_images}:
            stored_images.append(kernel_images.StoredImage(data, sha, sorted(_parsed(data).kernels)))
    with ArchiveWriter(inputs.path, sign_key=trust.configured_key(inputs.options)) as w:
        image_records = store_images(w, stored_images, inputs.image_store)
        image_index = {im.sha256: i for i, im in enumerate(stored_images)}
        module_variables = [
            schema.ModuleVariable(image=image_index[sha], name=name, size=len(value),
                                  value=w.add_blob(f"module-variable/{i}", value), refs=vrefs)
            for i, (sha, _, name, value, vrefs) in enumerate(relocations)]
        templates: list[schema.GraphTemplate] = []
        template_of: dict[str, int] = {}
        records = []
        for i, e in enumerate(entries):
            g = e.graph
            ident = template_identity(g.nodes["kind"], g.edges)
            if ident not in template_of:
                template_of[ident] = len(templates)
                templates.append(schema.GraphTemplate(
                    num_nodes=len(g.nodes), kinds_sha256=ident,
                    edges=w.add_blob(f"template/{len(templates)}/edges", g.edges.tobytes()) if len(g.edges) else "",
                    num_edges=len(g.edges)))
            outputs, tree, constants = flatten_outputs(e.key, e.outputs) if not e.is_child else ([], "", {})
            for spec in outputs:
                if not (lo <= spec.address < hi):
                    raise UnsafeAddress(f"graph {e.key!r}: an output tensor at {spec.address:#x} is outside the arena")
            records.append(schema.GraphRecord(
                key=e.key, template=template_of[ident],
                nodes=w.add_blob(f"graph/{i}/nodes", g.nodes.tobytes()),
                payload=w.add_blob(f"graph/{i}/payload", g.payload) if g.payload else "",
                attrs=w.add_blob(f"graph/{i}/attrs", g.attrs.tobytes()) if len(g.attrs) else "",
                num_kernel_nodes=g.num_kernel_nodes, outputs=outputs, output_tree=tree,
                output_constants=constants, is_child=e.is_child,
                capture_seconds=e.capture_seconds, rng=rng_of.get(i, [])))
        snap_records = [
            schema.MemorySnapshot(address=a, size=len(data), blob=w.add_blob(f"snapshot/{a:#x}", data), note=note)
            for a, data, note in snapshots
        ]
        manifest = schema.Manifest(
            schema_version=schema.SCHEMA_VERSION,
            created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            fingerprint=fingerprint,
            arena=schema.ArenaLayout(base=arena.base, size=arena.size, granularity=arena.granularity,
                                     capture_start=start, capture_end=end),
            blobs={}, images=image_records, functions=functions, templates=templates, graphs=records,
            snapshots=snap_records, num_events=len(events), extra=dict(inputs.extra), slots=slots,
            trace=_allocation_trace(inputs, words), module_variables=module_variables,
        )
        path = w.finish(manifest)
    stats["total_seconds"] = time.perf_counter() - t0
    stats["archive_bytes"] = float(path.stat().st_size)
    facts = snapshot_facts(manifest)
    stats.update({k: float(v) for k, v in facts.items() if not isinstance(v, dict) and v != -1})
    if facts["outputs_in_snapshots"]:
        log.info("foundry: %d of %d graph outputs (%.1f MiB) lie in warm-up snapshots (%d snapshots, %.1f MiB), which "
                 "LOAD writes back on restore()'s path; graph outputs are expected in the graph pool",
                 facts["outputs_in_snapshots"], facts["outputs"], facts["output_bytes_in_snapshots"] / 2**20,
                 facts["snapshots"], facts["snapshot_bytes"] / 2**20)
    log.info("foundry: saved %d graphs (%d templates, %d images, %d snapshots) to %s in %.2fs",
             sum(not e.is_child for e in entries), len(templates), len(image_records), len(snap_records), path,
             stats["total_seconds"])
    return path


def _check_module_globals(inputs: SaveInputs, entries: list[_Entry], handles: list[int], refs, stored_images,
                          functions, stats: dict[str, float]) -> list[tuple]:
    """``modglobals``: argument words pointing into module variables whose address a library asked for, and
    variables of the graphs' modules whose live bytes differ from the image's. ``options.module_globals``:
    ``warn`` (default) logs and counts them (a failure of the check itself is logged, not raised), ``refuse``
    raises, ``off`` skips. Returns the relocation plan (``relocate`` only; else empty)."""
    mode = inputs.options.module_globals
    env = ENV["module_globals"]
    if mode == "off":
        return []
    try:
        recorded = inputs.images.globals() if hasattr(inputs.images, "globals") else []
        found = []
        for e in entries:
            found += modglobals.argument_refs(e.key, e.graph.payload, _kernel_and_copy_spans(e.graph), recorded)
        changed = modglobals.changed_values(_graph_modules(handles, refs, stored_images),
                                            modglobals.driver_address_of, modglobals.driver_read)
    except Exception as err:
        if mode in ("refuse", "relocate"):
            raise
        log.warning("foundry: the module-variable check could not run (%s: %s); %s=refuse makes this an error",
                    type(err).__name__, err, env)
        return []
    stats["module_globals_recorded"] = float(len(recorded))
    stats["module_global_refs"] = float(len(found))
    stats["module_globals_changed"] = float(len(changed))
    by_key = {e.key: e.graph for e in entries}
    lines = [r.describe(_node_name(by_key[r.graph], r.node, functions)) for r in found]
    lines += [c.describe() for c in changed]
    if mode == "relocate":
        plan = _relocation_plan(inputs, entries, found, changed, recorded)
        for _, _, name, value, vrefs in plan:
            log.info("foundry: module variable %s (%d bytes): value saved, %d argument word(s) relocated at LOAD",
                     name, len(value), len(vrefs))
        return plan
    if not lines:
        return []
    if mode == "refuse":
        cls = UnsafeAddress if found else UnsupportedGraph
        raise cls(f"{lines[0]} ({len(found)} argument reference(s), {len(changed)} changed variable(s) in all; "
                  f"LOAD cannot recreate module memory; {env}=warn saves anyway)")
    for line in lines[:20]:
        log.warning("foundry: %s; LOAD may restore this graph to wrong results (%s=refuse refuses it)", line,
                    env)
    if len(lines) > 20:
        log.warning("foundry: ... and %d more module-variable finding(s)", len(lines) - 20)
    return []


def _parsed(data: bytes):
    """The ELF of an image this GPU loads (cubin.ImageInfo), or an empty one when it cannot be read."""
    try:
        chosen = cubin.parse_image(data).for_arch(kernel_images.device_arch())
    except ValueError:
        chosen = None
    return chosen if chosen is not None else cubin.ImageInfo(kind="elf", arch=0, kernels={})


def _relocation_plan(inputs: SaveInputs, entries: list[_Entry], found, changed, recorded
                     ) -> list[tuple[str, bytes, str, bytes, list[tuple[int, int, int]]]]:
    """(image sha256, image bytes, variable name, live bytes, [(graph index, payload offset, offset inside)]) per
    module variable the graphs point into or whose value changed since load (module-variable policy relocate)."""
    index = {e.key: i for i, e in enumerate(entries)}
    by_var: dict[tuple[str, int], Any] = {(g.name, g.address): g for g in recorded}
    images = inputs.images.images() if found else []  # copies of every recorded image: once
    module_images = inputs.images.module_images() if found else {}
    parsed: dict[int, Any] = {}  # id(image bytes) -> ImageInfo; the bytes live in `images` meanwhile

    def parse(data: bytes):
        if id(data) not in parsed:
            parsed[id(data)] = _parsed(data)
        return parsed[id(data)]

    located: dict[tuple[str, int], tuple[str, bytes]] = {}
    plan: dict[tuple[str, str], list] = {}
    for r in found:
        if (r.name, r.var_address) not in located:
            located[(r.name, r.var_address)] = modglobals.image_of_variable(by_var[(r.name, r.var_address)], images,
                                                                            module_images, parse)
        sha, data = located[(r.name, r.var_address)]
        key = (sha, r.name)
        if key not in plan:
            plan[key] = [sha, data, r.name, modglobals.driver_read(r.var_address, r.var_size), []]
        graph = entries[index[r.graph]].graph
        plan[key][4].append((index[r.graph], int(graph.nodes[r.node]["payload_off"]) + r.offset,
                             r.address - r.var_address))
    for c in changed:  # their images hold graph kernels: archived already
        plan.setdefault((c.image_sha256, c.name), [c.image_sha256, b"", c.name, c.live, []])
    return [tuple(v) for v in plan.values()]


def _graph_modules(handles: list[int], refs, stored_images) -> dict[int, tuple[str, dict]]:
    """Live CUmodule of every graph function -> (its image's sha256, that image's module variables for this GPU)."""
    drv = driver()
    data = {im.sha256: im.data for im in stored_images}
    variables: dict[str, dict] = {}
    out: dict[int, tuple[str, dict]] = {}
    for h, ref in zip(handles, refs):
        mod = int(call("cuFuncGetModule", drv.cuFuncGetModule, drv.CUfunction(h)))
        if mod in out:
            continue
        if ref.sha256 not in variables:
            variables[ref.sha256] = dict(_parsed(data[ref.sha256]).globals) if ref.sha256 in data else {}
        out[mod] = (ref.sha256, variables[ref.sha256])
    return out


def _referenced_slots(entries: list[_Entry], recorder) -> list[schema.SlotSpec]:
    """The slot descriptions of every placeholder node in the saved graphs, by id."""
    ids: list[int] = []
    for e in entries:
        refs = e.graph.nodes["ref"][e.graph.nodes["kind"] == schema.NODE_SLOT]
        if len(refs) and e.is_child:
            raise UnsupportedGraph(f"graph {e.key!r}: placeholder (slot) nodes inside a child graph are not supported")
        ids.extend(int(r) for r in refs)
    if len(set(ids)) != len(ids):
        raise UnsupportedGraph("a slot placeholder appears twice in the saved graphs; launch one per collective")
    if ids and recorder is None:
        raise UnsupportedGraph("graphs hold slot placeholders but the session recorded no slots")
    missing = [i for i in ids if i not in recorder.specs] if ids else []
    if missing:
        raise UnsupportedGraph(f"slot placeholder {missing[0]} has no recorded description")
    return [recorder.specs[i] for i in sorted(ids)]


def snapshot_facts(m: schema.Manifest) -> dict:
    """What LOAD writes back besides the graphs: snapshot count and bytes (uncompressed, by note, and as stored when
    the manifest's blob table is filled), the capture region, and how many graph outputs lie inside a snapshot
    (outputs are allocated during capture and belong in the graph pool; one inside a warm-up snapshot means the
    capture allocated from the warm-up pool). Manifest only: no GPU, no blob reads."""
    spans = sorted((s.address, s.address + s.size) for s in m.snapshots)
    starts = np.array([a for a, _ in spans], dtype=np.uint64)
    by_note: dict[str, int] = {}
    for s in m.snapshots:
        by_note[s.note or "?"] = by_note.get(s.note or "?", 0) + s.size
    inside = inside_bytes = outputs = 0
    for g in m.graphs:
        for t in g.outputs:
            outputs += 1
            k = int(np.searchsorted(starts, np.uint64(t.address), side="right")) - 1
            if k >= 0 and t.address + max(t.storage_bytes, 1) <= spans[k][1]:
                inside += 1
                inside_bytes += t.storage_bytes
    stored = [m.blobs[s.blob].stored_size for s in m.snapshots if s.blob in m.blobs]
    return {
        "snapshots": len(m.snapshots),
        "snapshot_bytes": sum(s.size for s in m.snapshots),
        "snapshot_stored_bytes": sum(stored) if len(stored) == len(m.snapshots) else -1,
        "snapshot_bytes_by_note": by_note,
        "capture_region_bytes": m.arena.capture_end - m.arena.capture_start,
        "outputs": outputs,
        "outputs_in_snapshots": inside,
        "output_bytes_in_snapshots": inside_bytes,
    }


def _node_name(g: DecodedGraph, node: int, functions) -> str:
    rec = g.nodes[node]
    if rec["kind"] == schema.NODE_KERNEL:
        return f"kernel '{functions[int(rec['ref'])].name}'"
    return schema.NODE_KIND_NAMES[int(rec["kind"])]


def _allocation_trace(inputs: SaveInputs, words: np.ndarray) -> schema.AllocationTrace:
    """The arena's trace from open() to now (LOAD must reproduce the part before the capture phase) and the live
    blocks of that time which the graphs' arguments (``words``) point into."""
    import torch

    arena = inputs.arena
    rows = arena.trace()
    compared = inputs.trace_at_capture
    held: dict[int, str] = {}
    segments = {int(seg["address"]): seg for seg in torch.cuda.memory_snapshot()}
    for i in np.nonzero(rows["op"][:compared] == layout.OP_ALLOC)[0].tolist():
        seg = segments.get(arena.base + int(rows[i]["offset"]))
        if seg is None:
            continue
        sizes = sorted((int(b["size"]) for b in seg["blocks"] if b["state"] == "active_allocated"), reverse=True)
        if sizes:
            shown = ", ".join(layout.human_bytes(n) for n in sizes[:3]) + (" …" if len(sizes) > 3 else "")
            held[i] = f"{len(sizes)} tensor(s): {shown}"
    blocks = layout.read_blocks(inputs.blocks_at_capture, words, arena.base)
    return layout.encode(rows, compared, list(inputs.labels), held, blocks)


def _find_rng_states(inputs: SaveInputs, entries: list[_Entry], words: np.ndarray) -> dict[int, list[schema.RngState]]:
    """Graphs whose arguments hold a pair of pointers into the graph-safe RNG state PyTorch allocated in
    capture_begin (PhiloxCudaState: seed pointer, offset pointer — a lone stale copy in padding does not count):
    replay each once with the generator at a probe offset, read the state back to tell seed from offset, and
    measure how far the replay advanced the generator (torch's whole-graph increment). The generator state is
    put back after; the replay writes what the graph writes, like one more warm-up."""
    import torch

    blocks = sorted(a for a, _ in inputs.capture_begin_blocks)
    if not blocks or not len(words):
        return {}
    graphs = {g.key: g.graph for g in inputs.graphs}
    gen = torch.cuda.default_generators[inputs.device]
    out: dict[int, list[schema.RngState]] = {}
    for i, e in enumerate(entries):
        if e.is_child:
            continue
        refs = rng_state_refs(_graph_words(e, entries), blocks)
        if not refs:
            continue
        saved_state = gen.get_state()
        seed = gen.initial_seed()
        probe = ((gen.get_offset() + (1 << 40) + 0x5EED0) // 4) * 4
        try:
            gen.set_offset(probe)
            graphs[e.key].replay()
            torch.cuda.synchronize()
            increment = gen.get_offset() - probe
            values = {a: _read_u64(a, inputs.device) for a in refs}
        finally:
            gen.set_state(saved_state)
        seeds = [a for a, v in values.items() if v == seed % (1 << 64)]
        offsets = [a for a, v in values.items() if v == probe]
        if increment == 0:
            continue  # the graph draws no random numbers; the words are stale copies
        if len(seeds) != 1 or len(offsets) != 1:
            raise UnsupportedGraph(
                f"graph {e.key!r} draws random numbers (generator advanced by {increment}) but its RNG state could "
                "not be identified (a generator other than the default CUDA generator?); keep random sampling "
                "outside the graph or use the default generator")
        out[i] = [schema.RngState(generator="default", seed_address=seeds[0], offset_address=offsets[0],
                                  increment=int(increment))]
        log.info("foundry: graph %r draws random numbers: Philox state at %#x/%#x, +%d per replay", e.key, seeds[0],
                 offsets[0], increment)
    return out


def rng_state_refs(words: np.ndarray, blocks) -> list[int]:
    """Addresses among ``blocks`` that ``words`` hold as an adjacent pair of two different ones (PhiloxCudaState's
    seed and offset pointers); a lone copy (stale padding) does not count."""
    w = np.asarray(words, np.uint64)
    state = np.isin(w, np.asarray(list(blocks), np.uint64))
    pairs = state[:-1] & state[1:] & (w[:-1] != w[1:])
    return sorted(set(w[:-1][pairs].tolist()) | set(w[1:][pairs].tolist()))


def _graph_words(e: _Entry, entries: list[_Entry]) -> np.ndarray:
    """All 8-byte argument words of a graph and its child graphs."""
    parts = []
    for _, off, n in _kernel_and_copy_spans(e.graph):
        parts.append(np.frombuffer(e.graph.payload, "<u8", count=n // 8, offset=off))
    parts += [_graph_words(entries[c], entries) for c in e.child_indices]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def _read_u64(address: int, device: int) -> int:
    t = tensor_at(schema.TensorSpec(address=address, dtype="int64", shape=[1], strides=[1], storage_bytes=8), device)
    return int(t.item()) % (1 << 64)


def _output_addresses(entries: list[_Entry]) -> np.ndarray:
    addrs = []
    for e in entries:
        if not e.is_child and e.outputs is not None:
            addrs += [spec.address for spec in flatten_outputs(e.key, e.outputs)[0]]
    return np.unique(np.asarray(addrs, np.uint64))


def _snapshot_blocks(inputs: SaveInputs, words: np.ndarray, outputs: np.ndarray = np.zeros(0, np.uint64)
                     ) -> list[tuple[int, bytes, str]]:
    """Contents of live blocks of the warm-up pool that graphs may read (small ones, or ones arguments point
    into); with ``options.snapshot_graph_pool`` also the live blocks of the graph pool arguments point into that
    hold no graph output (memory the capture allocated and kept, e.g. a cuBLAS workspace for the capture
    stream: LOAD maps the capture region but writes nothing there)."""
    import torch

    pools = {tuple(inputs.warmup_pool.id): "warmup"}
    if inputs.graph_pool is not None and inputs.options.snapshot_graph_pool:
        pools[tuple(inputs.graph_pool.id)] = "graphs"
    out = []
    for seg in torch.cuda.memory_snapshot():
        pool = pools.get(tuple(seg.get("segment_pool_id", ())))
        if pool is None:
            continue
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            addr, size = int(blk["address"]), int(blk["size"])
            referenced = _any_within(words, addr, size)
            if pool == "graphs":
                take, note = referenced and not _any_within(outputs, addr, size), "graph pool"
            else:
                take, note = size <= SNAPSHOT_SMALL_BYTES or referenced, "referenced" if referenced else "small"
            if take:
                t = tensor_at(schema.TensorSpec(address=addr, dtype="uint8", shape=[size], strides=[1],
                                                storage_bytes=size), inputs.device)
                out.append((addr, t.cpu().numpy().tobytes(), note))
    return out


def _any_within(sorted_words: np.ndarray, addr: int, size: int) -> bool:
    """Whether a value of the sorted array lies in [addr, addr + size)."""
    i = np.searchsorted(sorted_words, np.uint64(addr))
    return bool(i < len(sorted_words) and int(sorted_words[i]) < addr + size)
