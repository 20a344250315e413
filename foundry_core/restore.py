"""LOAD: rebuild executable graphs from an archive without capturing and without running the workload.

Order of work (each step timed in ``RestoreStats``): compare this process's arena allocation trace and live blocks
with SAVE's (``layout``: a different layout is refused before anything is rebuilt); map the capture region of the
arena and write back the warm-up buffers graphs read; load kernel images and resolve functions; then build +
instantiate + upload graphs in ``_native/restore.c`` (one native call per graph). The first graph is built before
``restore()`` returns; the others are built by a background thread in the requested order.
``RestoredGraph.replay()`` waits for its own graph if it is not ready yet, and raises a FoundryError if it could
not be built (never waits forever); for a graph that draws random numbers it first does what
``CUDAGraph.replay()`` does with the generator (``rng_prologue``). Before any of it, every table is checked against
the manifest and the arena (``validate``).
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from foundry_core import images as kernel_images
from foundry_core import layout, modglobals, schema, validate
from foundry_core.errors import ArchiveError, FoundryError, NativeBuildError
from foundry_core.native import call, driver, native_lib
from foundry_core.outputs import output_structure, tensor_at, unflatten_outputs
from foundry_core.slots import check_fillable, check_slot_specs, fill_slots
from foundry_core.store import image_bytes

__all__ = ["RestoreInputs", "Restoration", "RestoredGraph", "RestoreStats", "check_archive_offline",
           "restore_archive"]

log = logging.getLogger("foundry_core.restore")


@dataclass
class RestoreStats:
    layout_seconds: float = 0.0  # allocation trace read back and compared with SAVE's
    layout_records: int = 0
    blocks_seconds: float = 0.0  # live blocks of the init pool read and compared with SAVE's
    layout_blocks: int = 0
    map_seconds: float = 0.0
    snapshot_seconds: float = 0.0
    images_seconds: float = 0.0  # kernel images + functions, in the preloader (overlaps the app's own init)
    decode_seconds: float = 0.0  # graph tables read/verified/decoded, in the preloader
    preload_wait_seconds: float = 0.0  # how long restore() waited for the preloader
    first_graph_seconds: float = 0.0  # from restore() start until the first graph is instantiated
    returned_seconds: float = 0.0  # from restore() start until it returned (what its caller waited)
    all_graphs_seconds: float = 0.0  # from restore() start until the last graph is instantiated
    build_seconds: float = 0.0  # sum over graphs, native node loop (cuGraphAdd*Node, attributes, edges)
    instantiate_seconds: float = 0.0  # sum over graphs, cuGraphInstantiate + upload
    slot_seconds: float = 0.0  # capturing slot fillers (e.g. collectives) into the graphs, on restore()'s thread
    num_slots: int = 0
    num_graphs: int = 0
    num_nodes: int = 0
    num_snapshots: int = 0
    snapshot_bytes: int = 0  # warm-up buffers written back (uncompressed), on restore()'s thread
    snapshot_stored_bytes: int = 0  # the same as stored in the archive (zlib or raw)
    capture_region_bytes: int = 0  # the capture region restore() maps in one piece
    per_graph: dict[str, float] = field(default_factory=dict)

    def phases(self) -> dict[str, float]:
        """Every timing and count (not ``per_graph``), for reports and JSON."""
        return {k: v for k, v in vars(self).items() if k != "per_graph"}

    def summary(self) -> str:
        """One line: where restore() spent its time (``restore_archive`` logs it once per restore)."""
        mib = 1 << 20
        return (f"layout {self.layout_seconds:.3f}s ({self.layout_records} records), blocks {self.blocks_seconds:.3f}s "
                f"({self.layout_blocks}), map {self.map_seconds:.3f}s ({self.capture_region_bytes / mib:.0f} MiB "
                f"capture region), snapshots {self.snapshot_seconds:.3f}s ({self.num_snapshots}, "
                f"{self.snapshot_bytes / mib:.1f} MiB from {self.snapshot_stored_bytes / mib:.1f} MiB stored), "
                f"preloader wait {self.preload_wait_seconds:.3f}s (its tables {self.decode_seconds:.3f}s, "
                f"images {self.images_seconds:.3f}s), first graph {self.first_graph_seconds:.3f}s, "
                f"slots {self.num_slots} in {self.slot_seconds:.3f}s; returned after {self.returned_seconds:.3f}s")


class RestoredGraph:
    """Drop-in for a replay-only ``torch.cuda.CUDAGraph`` whose executable was rebuilt from an archive."""

    def __init__(self, key: str, outputs: Any, lib):
        self.key = key
        self.outputs = outputs
        self._exec: Optional[int] = None
        self._graph: Optional[int] = None
        self._ready = threading.Event()
        self._error: Optional[str] = None
        self._lib = lib
        self._rng: list[tuple[Any, Any, int]] = []  # (seed tensor, offset tensor, increment) in the arena
        self._device = 0

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._error is None

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._ready.wait(timeout)
        if self._error:
            raise FoundryError(f"graph {self.key!r} could not be restored: {self._error}")
        return self._ready.is_set()

    def replay(self) -> None:
        import torch

        if not self._ready.is_set() or self._error:
            self.wait()  # blocks until instantiated; raises if it could not be
        if self._rng:
            rng_prologue(torch.cuda.default_generators[self._device], self._rng)
        rc = self._lib.foundry_launch(self._exec, torch.cuda.current_stream().cuda_stream)
        if rc != 0:
            raise FoundryError(f"cuGraphLaunch of restored graph {self.key!r} failed with CUresult {rc}")

    def reset(self) -> None:
        if self._exec:
            self._lib.foundry_exec_destroy(self._exec)
            self._exec = None
        if self._graph:
            self._lib.foundry_graph_destroy(self._graph)
            self._graph = None

    def __del__(self):
        try:
            self.reset()
        except Exception:
            pass


def rng_prologue(gen, states) -> None:
    """What ``CUDAGraph.replay()`` does before launching a graph that draws random numbers: write the generator's
    seed and current offset where the graph's kernels read them (int64 tensors in the arena), then advance the
    generator past the graph's draws. ``states``: (seed tensor, offset tensor, increment) per RNG state."""
    for seed_t, offset_t, increment in states:
        offset = gen.get_offset()
        seed_t.fill_(_as_int64(gen.initial_seed()))
        offset_t.fill_(_as_int64(offset))
        gen.set_offset(offset + increment)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def rank_patches(m: schema.Manifest, rank: Optional[int]) -> list[schema.BytePatch]:
    """The byte patches that turn the graphs of ``schema.for_rank(m, rank)`` into ``rank``'s; empty for rank 0, a
    plain single-rank archive or a rank stored as a variant."""
    if m.ranks is None or not rank:
        return []
    return list(schema.for_rank(m, rank).ranks.deltas[0].patches)  # for_rank keeps exactly the rank's delta


def apply_patches(data: np.ndarray, patches: Iterable[schema.BytePatch], what: str) -> np.ndarray:
    """A copy of ``data`` (uint8) with ``patches`` written in; a patch outside it is an ArchiveError."""
    patches = list(patches)
    if not patches:
        return data
    out = np.array(data, dtype=np.uint8, copy=True)
    for p in patches:
        if p.offset < 0 or p.offset + len(p.data) > len(out):
            raise ArchiveError(f"rank delta patch at {p.offset}+{len(p.data)} lies outside {what}")
        out[p.offset:p.offset + len(p.data)] = np.frombuffer(p.data, np.uint8)
    return out


def graph_tables(archive, m: schema.Manifest, index: int, patches: Iterable[schema.BytePatch] = ()):
    """(nodes, payload, attrs, edges) arrays of graph ``index``, checked against its template, the manifest's
    tables and the arena (``validate.check_graph_tables``); ``patches`` (this rank's, for this graph) are applied
    to the payload first, so what is checked is what is built."""
    rec = m.graphs[index]
    tpl = m.templates[rec.template]
    nodes = archive.blob_array(rec.nodes, schema.NODE_DTYPE)
    payload = archive.blob_array(rec.payload, np.uint8) if rec.payload else np.zeros(0, np.uint8)
    payload = apply_patches(payload, patches, f"graph {rec.key!r}'s arguments")
    attrs = archive.blob_array(rec.attrs, schema.ATTR_DTYPE) if rec.attrs else np.zeros(0, schema.ATTR_DTYPE)
    edges = archive.blob_array(tpl.edges, schema.EDGE_DTYPE) if tpl.num_edges else np.zeros(0, schema.EDGE_DTYPE)
    if len(nodes) != tpl.num_nodes or len(edges) != tpl.num_edges:
        raise ArchiveError(f"{archive.path}: graph {rec.key!r} does not match its template")
    validate.check_graph_tables(f"{archive.path}: graph {rec.key[:60]!r}", m, index, nodes, payload, attrs, edges,
                                archive.options.allow_foreign_pointers)
    return nodes, payload, attrs, edges


def check_archive_for_load(archive, rank: Optional[int] = None) -> dict[int, tuple]:
    """Everything LOAD can check without a GPU: every graph's tables (with ``rank``'s patches applied), the child
    graphs between them and the output structures. Returns graph index -> (nodes, payload, attrs, edges)."""
    arrays = check_tables_for_load(archive, rank)
    check_output_structures(archive)
    return arrays


def check_tables_for_load(archive, rank: Optional[int] = None) -> dict[int, tuple]:
    """The part of :func:`check_archive_for_load` that needs no torch: graph tables and child graphs."""
    m = schema.for_rank(archive.manifest, rank)
    patches: dict[int, list] = {}
    for p in rank_patches(m, rank):
        if p.graph >= 0:
            patches.setdefault(p.graph, []).append(p)
    arrays = {i: graph_tables(archive, m, i, patches.get(i, ())) for i in range(len(m.graphs))}
    child_refs = {i: nodes["ref"][nodes["kind"] == schema.NODE_CHILD_GRAPH].tolist()
                  for i, (nodes, *_) in arrays.items()}
    validate.check_child_graphs(str(archive.path), m, child_refs)
    return arrays


def check_output_structures(archive) -> None:
    """The part of :func:`check_archive_for_load` that reads torch's pytree format: every graph's outputs (those of
    every rank variant too)."""
    for rec in (g for m in schema.rank_manifests(archive.manifest) for g in m.graphs):
        try:
            output_structure(rec)
        except ArchiveError as e:
            raise ArchiveError(f"{archive.path}: {e}") from None


def check_archive_offline(archive) -> None:
    """Everything LOAD checks without a GPU, for every rank the archive serves: the decompression budget, the
    allocation trace, and :func:`check_archive_for_load` with each rank's patches. ``verify`` and ``sign`` run it,
    so that they pass only what LOAD accepts."""
    m = archive.manifest
    archive.check_inflate_budget()
    for trace in (v.trace for v in schema.rank_manifests(m) if v.trace is not None):
        layout.decode(trace, str(archive.path), archive.inflate_budget)
        layout.decode_blocks(trace, str(archive.path), archive.inflate_budget)
    for rank in [None] if m.ranks is None else range(m.ranks.world_size):
        check_tables_for_load(archive, rank)
    check_output_structures(archive)


class Preloader:
    """LOAD work that needs neither the arena nor the application: verify and decode graph tables, load kernel
    images and resolve functions. ``Session.open()`` starts it, so it overlaps the application's own start-up
    (weights, KV cache); ``restore()`` waits for it.

    ``bind``: makes the device's context current on the preparing thread; default ``torch.cuda.set_device``.
    Given one (``foundry_core.early`` binds the primary context through the driver, before torch is imported),
    the preparation needs no torch, and the output structures (torch's pytree format) are checked in ``wait()``
    on the caller's thread instead. ``options``: where the native helper is built (its kernel loader does the
    image loads in one call; without a helper they go through Python)."""

    def __init__(self, archive, device: int, rank: Optional[int] = None, bind=None, options=None):
        self.archive = archive
        self.options = options
        self.device = device
        self.rank = rank
        self.modules: list[int] = []
        self.functions = np.zeros(0, np.uint64)
        self.arrays: dict[int, tuple] = {}
        self.images_seconds = self.decode_seconds = 0.0
        self._bind = bind
        self._outputs_checked = False
        self._error: Optional[BaseException] = None
        self._done = threading.Event()

    def start(self) -> "Preloader":
        threading.Thread(target=self.run, name="foundry-preload", daemon=True).start()
        return self

    def run(self) -> None:
        """Do the preparation on this thread (``start()`` runs it on a new one); errors go to ``wait()``."""
        try:
            if self._bind is None:
                import torch

                torch.cuda.set_device(self.device)
            else:
                self._bind(self.device)
            m = self.archive.manifest
            t = time.perf_counter()
            self.arrays = check_tables_for_load(self.archive, self.rank)  # all checked before it reaches the GPU
            if self._bind is None:
                check_output_structures(self.archive)
                self._outputs_checked = True
            t2 = time.perf_counter()
            self.decode_seconds = t2 - t
            modules, functions = kernel_images.load_kernels([image_bytes(self.archive, img) for img in m.images],
                                                            m.functions, lib=self._native_loader())
            self.modules, self.functions = modules, np.asarray(functions, dtype=np.uint64)
            if m.module_variables:  # SAVE ran with the module-variable policy relocate
                self.arrays = modglobals.apply_variables(m.module_variables, self.arrays, self.modules,
                                                         modglobals.driver_address_of, modglobals.driver_write,
                                                         self.archive.blob)
            self.images_seconds = time.perf_counter() - t2
        except BaseException as e:  # handed to restore()
            self._error = e
        finally:
            self._done.set()

    def _native_loader(self):
        """The native helper, whose kernel loader the preparation uses; None (Python loads) if it cannot be had."""
        try:
            return native_lib(self.options)
        except NativeBuildError as e:
            log.debug("foundry: native kernel loader unavailable (%s); loading through Python", e)
            return None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> "Preloader":
        self._done.wait()
        if self._error is not None:
            if isinstance(self._error, FoundryError):
                raise self._error
            raise FoundryError(f"preparing kernels from the archive failed: {self._error}") from self._error
        if not self._outputs_checked:
            check_output_structures(self.archive)
            self._outputs_checked = True
        return self

    def unload(self) -> None:
        """Unload the kernel modules (after ``wait``; for a preparation nobody will use)."""
        self._done.wait()
        if self.modules:
            kernel_images.unload_modules(self.modules)
            self.modules = []


class TableSizes(ctypes.Structure):
    """Mirrors ``TableSizes`` in ``_native/restore.c``: how far each table a node record indexes into reaches."""

    _fields_ = [("payload_size", ctypes.c_uint64), ("n_attrs", ctypes.c_uint32), ("n_funcs", ctypes.c_uint32),
                ("n_events", ctypes.c_uint32), ("n_children", ctypes.c_uint32)]


class NativeTables:
    """One graph's tables as the native builder takes them: pointers plus the sizes it checks records against."""

    def __init__(self, nodes: np.ndarray, payload: np.ndarray, attrs: np.ndarray, edges: np.ndarray,
                 functions: np.ndarray, events: np.ndarray, children: np.ndarray):
        self.arrays = (nodes, payload, attrs, edges, functions, events, children)  # kept alive for the call
        self.sizes = TableSizes(len(payload), len(attrs), len(functions), len(events), len(children))

    def pointers(self) -> tuple:
        """(nodes, n_nodes, payload, attrs, edges, n_edges, funcs, events, children) for the C signature."""
        nodes, payload, attrs, edges, functions, events, children = self.arrays

        def ptr(a: np.ndarray):
            return a.ctypes.data if len(a) else None

        return (ptr(nodes), len(nodes), ptr(payload), ptr(attrs), ptr(edges), len(edges), ptr(functions), ptr(events),
                ptr(children))


def native_check(lib, tables: NativeTables) -> Optional[str]:
    """The native builder's own bounds check (no CUDA needed): None when every record is in bounds, else why not."""
    err = ctypes.create_string_buffer(512)
    if lib.foundry_check_graph(*tables.pointers(), ctypes.byref(tables.sizes), err, len(err)) == 0:
        return None
    return err.value.decode(errors="replace")


class GraphBuilder:
    """Holds decoded tables and builds graphs natively."""

    def __init__(self, archive, manifest: schema.Manifest, lib, functions: np.ndarray, events: np.ndarray):
        self.archive = archive
        self.m = manifest
        self.lib = lib
        self.functions = functions  # uint64 CUfunction per manifest function index
        self.events = events
        self._children: dict[int, int] = {}  # graph index -> built CUgraph handle
        self._building: list[int] = []  # graphs being built, outermost first (child graphs nest)
        self._err = ctypes.create_string_buffer(512)
        self.arrays: dict[int, tuple] = {}  # graph index -> decoded tables (filled by the preloader)

    def build(self, index: int) -> tuple[int, int, np.ndarray]:
        """Build graph ``index``; returns (CUgraph, number of nodes, slot node pairs (in, out) in node order)."""
        rec = self.m.graphs[index]
        nodes, payload, attrs, edges = self.arrays.get(index) or graph_tables(self.archive, self.m, index)
        kinds = nodes["kind"]
        slot_nodes = np.zeros(2 * int((kinds == schema.NODE_SLOT).sum()), dtype=np.uint64)
        child_refs = nodes["ref"][kinds == schema.NODE_CHILD_GRAPH]
        self._building.append(index)
        try:
            children = np.array([self.child(int(r)) for r in child_refs], dtype=np.uint64)
        finally:
            self._building.pop()
        # Kernel refs index the global function table; child refs index `children` in node order.
        if len(child_refs):
            nodes = nodes.copy()
            nodes["ref"][kinds == schema.NODE_CHILD_GRAPH] = np.arange(len(child_refs), dtype=np.uint32)
        tables = NativeTables(nodes, payload, attrs, edges, self.functions, self.events, children)
        graph = ctypes.c_void_p()
        rc = self.lib.foundry_build_graph(
            *tables.pointers(), ctypes.byref(graph), self._err, len(self._err),
            slot_nodes.ctypes.data if len(slot_nodes) else None, len(slot_nodes) // 2, ctypes.byref(tables.sizes),
        )
        if rc != 0:
            raise FoundryError(f"rebuilding graph {rec.key!r}: {self._err.value.decode(errors='replace')}")
        return graph.value, len(nodes), slot_nodes

    def slot_ids(self, index: int) -> list[int]:
        nodes = self.arrays[index][0] if index in self.arrays else graph_tables(self.archive, self.m, index)[0]
        return [int(r) for r in nodes["ref"][nodes["kind"] == schema.NODE_SLOT]]

    def child(self, index: int) -> int:
        if index not in self._children:
            parent = self.m.graphs[self._building[-1]].key[:60] if self._building else "?"
            if not (0 <= index < len(self.m.graphs) and self.m.graphs[index].is_child):
                raise ArchiveError(f"{self.archive.path}: graph {parent!r} refers to child graph {index}, which is "
                                   "not a child graph of this archive")
            if index in self._building or len(self._building) > validate.MAX_CHILD_DEPTH:
                raise ArchiveError(f"{self.archive.path}: graph {parent!r} contains child graph {index} within "
                                   "itself (a cycle) or too deep")
            graph, _, slots = self.build(index)
            if len(slots):
                raise FoundryError(f"graph {self.m.graphs[index].key!r}: slot nodes inside a child graph")
            self._children[index] = graph
        return self._children[index]

    def instantiate(self, graph: int, stream: int) -> int:
        exec_ = ctypes.c_void_p()
        if self.lib.foundry_instantiate(graph, stream, ctypes.byref(exec_), self._err, len(self._err)) != 0:
            raise FoundryError(self._err.value.decode(errors="replace"))
        return exec_.value


def _one_line(e: BaseException) -> str:
    """A FoundryError's own message; anything else (a bug or a resource failure) with its type."""
    if isinstance(e, FoundryError):
        return str(e)
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


#: Logged once the last graph is instantiated (restore() logs its summary when it returns, before that).
ALL_READY_MESSAGE = ("foundry: all %d graphs ready %.3fs after restore() began (build %.3fs, instantiate and upload "
                     "%.3fs, %d nodes)")


def build_all(builder: GraphBuilder, order: Iterable[int], graphs: dict[int, RestoredGraph], stats: RestoreStats,
              t0: float, device: int, stream, slots: Optional[SlotPipeline] = None) -> None:
    """Build (or take from ``slots`` once filled) and instantiate graphs in ``order``, marking each ready as
    soon as it is.

    Never raises and never leaves a graph unmarked: a graph that cannot be built carries its error, so its
    ``replay()`` raises a FoundryError instead of waiting for a thread that has died.
    """
    order = list(order)
    done = 0
    try:
        import torch

        torch.cuda.set_device(device)
        for n, index in enumerate(order):
            rg = graphs[index]
            try:
                tb = time.perf_counter()
                filled = slots.take(index) if slots is not None else None
                if filled is not None:
                    graph, count = filled
                    tb = time.perf_counter()  # built and filled (and timed) by the filling thread
                else:
                    graph, count, unfilled = builder.build(index)
                    if len(unfilled):
                        builder.lib.foundry_graph_destroy(graph)
                        raise FoundryError(f"graph {rg.key!r} holds {len(unfilled) // 2} unfilled slot(s); "
                                           "not instantiated")
                ti = time.perf_counter()
                rg._exec = builder.instantiate(graph, stream.cuda_stream)
                te = time.perf_counter()
                rg._graph = graph
                stats.build_seconds += ti - tb
                stats.instantiate_seconds += te - ti
                stats.num_nodes += count
                stats.per_graph[rg.key] = te - tb
            except BaseException as e:  # every failure must reach replay(), whatever it is
                rg._error = _one_line(e)
                log.error("foundry: graph %r could not be restored: %s", rg.key, rg._error)
            finally:
                if n == len(order) - 1:
                    stream.synchronize()  # uploads done
                    stats.all_graphs_seconds = time.perf_counter() - t0
                if not stats.first_graph_seconds:
                    stats.first_graph_seconds = time.perf_counter() - t0
                rg._ready.set()
                if n == len(order) - 1 and all(g._ready.is_set() for g in graphs.values()):
                    # restore() logged its summary when it returned; what the background still did shows here
                    log.info(ALL_READY_MESSAGE, len(graphs), stats.all_graphs_seconds, stats.build_seconds,
                             stats.instantiate_seconds, stats.num_nodes)
                done = n + 1
    except BaseException as e:  # the thread itself failed: so do the graphs it did not reach
        reason = _one_line(e)
        log.error("foundry: restoring graphs stopped: %s", reason)
        for index in order[done:]:
            rg = graphs[index]
            if not rg._ready.is_set():
                rg._error = rg._error or reason
                rg._ready.set()


class SlotPipeline:
    """Hands graphs whose slots the main thread filled to the instantiating thread, one by one, so filling
    (which must stay on one thread, in the same order on every rank) overlaps instantiation."""

    def __init__(self, indices: Iterable[int]):
        self.events = {i: threading.Event() for i in indices}
        self.built: dict[int, tuple[int, int]] = {}
        self.error: Optional[str] = None

    def put(self, index: int, graph: int, count: int) -> None:
        self.built[index] = (graph, count)
        self.events[index].set()

    def fail(self, error: BaseException) -> None:
        self.error = str(error) or type(error).__name__
        for ev in self.events.values():
            ev.set()

    def take(self, index: int) -> Optional[tuple[int, int]]:
        """The filled graph ``index`` (waiting for it); None if it has no slots."""
        ev = self.events.get(index)
        if ev is None:
            return None
        ev.wait()
        if index not in self.built:
            raise FoundryError(f"filling its slots failed: {self.error}")
        return self.built.pop(index)


def fill_all_slots(builder: GraphBuilder, slot_ids: dict[int, list[int]], spec_of: dict, filler,
                   stats: RestoreStats, device: int, pipeline: SlotPipeline) -> None:
    """Build every graph that has slots and fill them on this thread, in the order of ``slot_ids`` (the order
    every rank of a layout shares); each is handed to ``pipeline`` as soon as it is filled."""
    import torch

    stream = torch.cuda.Stream(device)
    try:
        for index, ids in slot_ids.items():
            key = builder.m.graphs[index].key
            tb = time.perf_counter()
            graph, count, slot_nodes = builder.build(index)
            stats.build_seconds += time.perf_counter() - tb
            try:
                stats.slot_seconds += fill_slots(graph, slot_nodes, [spec_of[i] for i in ids], filler, stream, key)
            except BaseException:
                builder.lib.foundry_graph_destroy(graph)
                raise
            stats.num_slots += len(ids)
            pipeline.put(index, graph, count)
        stream.synchronize()
    except BaseException as e:
        pipeline.fail(e)
        raise


@dataclass
class RestoreInputs:
    """Everything LOAD reads besides the archive's own contents (``Session.restore()`` gathers them)."""

    archive: Any  # archive.Archive, already checked against this machine
    arena: Any  # allocator.Arena, reserved where SAVE had it; the application has allocated its init part
    device: int
    init_pool: Any  # torch.cuda.MemPool of the application's initialisation (its live blocks are compared)
    rank: Optional[int] = None  # which rank's delta of a rank template to apply
    preload: Optional[Preloader] = None  # started at open(); None: started here
    saved_trace: Any = None  # the archive's allocation trace, decoded (layout.decode); None: nothing to compare
    saved_blocks: Any = None  # SAVE's live blocks before the capture phase (layout.decode_blocks)


@dataclass
class Restoration:
    """What LOAD made: the graphs, its timings, and what must stay alive with them."""

    graphs: dict[str, RestoredGraph]
    stats: RestoreStats
    builder: GraphBuilder  # holds the loaded modules and built child graphs the restored graphs use
    thread: Optional[threading.Thread] = None  # instantiating the remaining graphs in the background


def restore_archive(inputs: RestoreInputs, order: Optional[Iterable[str]], background: bool,
                    slot_filler=None) -> Restoration:
    """The LOAD sequence; see the module docstring. ``order``: graph keys to build first (callers of a
    multi-rank layout pass the same order on every rank)."""
    import torch

    stats = RestoreStats()
    t0 = time.perf_counter()
    archive, arena, device = inputs.archive, inputs.arena, inputs.device
    m = archive.manifest
    start, end = m.arena.capture_start, m.arena.capture_end
    live = arena.trace()
    layout.check(m.trace, inputs.saved_trace, live, m.arena.granularity)
    stats.layout_seconds, stats.layout_records = time.perf_counter() - t0, len(live)
    t = time.perf_counter()
    blocks = layout.live_blocks(inputs.init_pool, arena.base)
    layout.check_blocks(m.trace, inputs.saved_blocks, blocks, inputs.saved_trace)
    stats.blocks_seconds, stats.layout_blocks = time.perf_counter() - t, len(blocks)
    t = time.perf_counter()
    if arena.cursor > start:
        raise FoundryError(
            f"the application allocated {arena.cursor - start} bytes more before restore() than before the "
            "capture phase in SAVE: its allocation sequence differs (model, KV-cache size or buffers changed?)"
        )
    arena.advance(start)
    arena.map_raw(start, end - start)
    stats.map_seconds = time.perf_counter() - t
    stats.capture_region_bytes = end - start

    if m.slots:
        check_slot_specs(m.slots, arena.base, arena.base + arena.size)
    snapshot_patches: dict[int, list] = {}
    for p in rank_patches(m, inputs.rank):
        if p.snapshot >= 0:
            snapshot_patches.setdefault(p.snapshot, []).append(p)
    t = time.perf_counter()
    for i, snap in enumerate(m.snapshots):
        data = archive.blob(snap.blob)
        if i in snapshot_patches:
            data = apply_patches(np.frombuffer(data, np.uint8), snapshot_patches[i], f"snapshot {i}").tobytes()
        dst = tensor_at(schema.TensorSpec(address=snap.address, dtype="uint8", shape=[snap.size], strides=[1],
                                          storage_bytes=snap.size), device)
        dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        stats.num_snapshots += 1
        stats.snapshot_bytes += len(data)
        stats.snapshot_stored_bytes += archive.info(snap.blob).stored_size
    stats.snapshot_seconds = time.perf_counter() - t

    t = time.perf_counter()
    preload = (inputs.preload or Preloader(archive, device, inputs.rank).start()).wait()
    stats.preload_wait_seconds = time.perf_counter() - t
    stats.images_seconds, stats.decode_seconds = preload.images_seconds, preload.decode_seconds
    modules, functions = preload.modules, preload.functions

    events = np.zeros(m.num_events, dtype=np.uint64)
    if m.num_events:
        drv = driver()
        for i in range(m.num_events):
            events[i] = int(call("cuEventCreate", drv.cuEventCreate, 0))

    lib = native_lib()
    builder = GraphBuilder(archive, m, lib, functions, events)
    builder.arrays = preload.arrays
    builder._modules = modules  # keep alive as long as graphs may be rebuilt
    graphs: dict[int, RestoredGraph] = {}
    for i, rec in enumerate(m.graphs):
        if rec.is_child:
            continue
        tensors = [tensor_at(spec, device) for spec in rec.outputs]
        outputs = unflatten_outputs(tensors, rec.output_tree, rec.output_constants)
        graphs[i] = rg = RestoredGraph(rec.key, outputs, lib)
        rg._device = device
        rg._rng = [(_int64_at(r.seed_address, device), _int64_at(r.offset_address, device), r.increment)
                   for r in rec.rng]
    index_of = {rg.key: i for i, rg in graphs.items()}
    wanted = [index_of[k] for k in (order or []) if k in index_of]
    ordered = wanted + sorted(set(graphs) - set(wanted))
    stats.num_graphs = len(ordered)
    stream = torch.cuda.Stream(device)
    if m.slots:
        # Slots are filled here, in `ordered` order (callers pass the same order on every rank); each filled
        # graph is instantiated by the background thread meanwhile.
        slot_ids = {i: ids for i in ordered if (ids := builder.slot_ids(i))}
        spec_of = check_fillable(m, slot_ids, slot_filler)
        pipeline = SlotPipeline(slot_ids)
        thread = threading.Thread(target=build_all, args=(builder, ordered, graphs, stats, t0, device, stream,
                                                          pipeline), name="foundry-restore", daemon=True)
        if background:
            thread.start()
        fill_all_slots(builder, slot_ids, spec_of, slot_filler, stats, device, pipeline)
        if not background:
            thread.start()
            thread.join()
            thread = None
    else:
        thread = None
        build_all(builder, ordered[:1], graphs, stats, t0, device, stream)
        rest = ordered[1:]
        if background and rest:
            thread = threading.Thread(target=build_all, args=(builder, rest, graphs, stats, t0, device, stream),
                                      name="foundry-restore", daemon=True)
            thread.start()
        else:
            build_all(builder, rest, graphs, stats, t0, device, stream)
    stats.returned_seconds = time.perf_counter() - t0
    log.info("foundry: restore() of %d graphs: %s", stats.num_graphs, stats.summary())
    return Restoration({rg.key: rg for rg in graphs.values()}, stats, builder, thread)


def _int64_at(address: int, device: int):
    return tensor_at(schema.TensorSpec(address=address, dtype="int64", shape=[1], strides=[1], storage_bytes=8), device)
