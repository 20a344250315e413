"""Slots: placeholder nodes that SAVE records and LOAD fills with work only the loading process can create.

Some work inside a graph cannot be archived, because it is welded to state that exists only in the process
that runs it: a collective on a live NCCL communicator is the typical case. SAVE therefore captures a
*placeholder* in its place — a no-op kernel of our own, launched with its slot id as the only argument — and
records a ``schema.SlotSpec`` describing what it stands for. The codec turns each placeholder kernel node into a
``NODE_SLOT`` record. At LOAD the native builder puts two empty nodes where the placeholder was (one carries its
incoming edges, one its outgoing edges) and :func:`fill_slots` captures the real work *into the restored graph*
between them (``cuStreamBeginCaptureToGraph``), in slot order, with a caller-supplied filler. A graph with an
unfilled slot is never instantiated.

The placeholder is built from PTX shipped here and loaded with the driver, so it needs no compiler and no
kernel image is archived for it.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Callable, Optional, Sequence

from foundry_core import schema
from foundry_core.errors import ArchiveError, FoundryError
from foundry_core.native import check, native_lib

__all__ = ["SlotRecorder", "SlotFiller", "placeholder_function", "fill_slots", "fill_captured", "check_fillable",
           "check_slot_specs", "UnfilledSlot"]

log = logging.getLogger("foundry_core.slots")

PLACEHOLDER_NAME = "foundry_slot_placeholder"
_PTX = b"""
.version 6.0
.target sm_50
.address_size 64
.visible .entry foundry_slot_placeholder(.param .u64 slot)
{
    ret;
}
"""

#: ``filler(spec)`` enqueues the real work of one slot on torch's current stream (which is capturing).
SlotFiller = Callable[[schema.SlotSpec], None]


class UnfilledSlot(FoundryError):
    """A graph still holds a placeholder that LOAD has no filler for."""


_modules: dict[int, tuple[object, int]] = {}  # CUcontext -> (CUmodule, CUfunction)
_lock = threading.Lock()


def placeholder_function() -> int:
    """The placeholder's CUfunction in the current context (loaded from PTX on first use)."""
    from cuda.bindings import driver as drv

    ctx = int(check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent"))
    if not ctx:
        raise FoundryError("no current CUDA context for the slot placeholder")
    with _lock:
        if ctx not in _modules:
            mod = check(drv.cuModuleLoadData(_PTX + b"\0"), "cuModuleLoadData(slot placeholder)")
            func = check(drv.cuModuleGetFunction(mod, PLACEHOLDER_NAME.encode()), "cuModuleGetFunction")
            _modules[ctx] = (mod, int(func))
        return _modules[ctx][1]


class SlotRecorder:
    """SAVE side: hands out slot ids, launches the placeholder and keeps each slot's description.

    Placeholders launched outside a capture (warm-ups) run as no-ops; only those that end up in a saved graph
    are written to the archive. A placeholder launched inside a capture also remembers its node, so that the SAVE
    process itself can fill it with the real work (:func:`fill_captured`) and serve the graph it captured.
    """

    def __init__(self):
        self.specs: dict[int, schema.SlotSpec] = {}
        self.nodes: dict[int, tuple[int, int]] = {}  # slot id -> (CUgraph being captured, its placeholder node)
        self._next = 1
        self._func: Optional[int] = None

    @property
    def function(self) -> int:
        if self._func is None:
            self._func = placeholder_function()
        return self._func

    def launch(self, op: str, **fields) -> int:
        """Record a slot and launch its placeholder on torch's current stream; returns the slot id."""
        import torch
        from cuda.bindings import driver as drv

        slot = self._next
        self._next += 1
        self.specs[slot] = schema.SlotSpec(id=slot, op=op, order=slot, **fields)
        stream = torch.cuda.current_stream().cuda_stream
        params = ((slot,), (ctypes.c_uint64,))
        check(drv.cuLaunchKernel(drv.CUfunction(self.function), 1, 1, 1, 1, 1, 1, 0, drv.CUstream(stream),
                                  params, 0), "cuLaunchKernel(slot placeholder)")
        if torch.cuda.is_current_stream_capturing():  # the capture's frontier is now the placeholder node alone
            info = check(drv.cuStreamGetCaptureInfo(drv.CUstream(stream)), "cuStreamGetCaptureInfo")
            graph, deps, count = info[2], list(info[3]), int(info[-1])
            if count != 1:
                raise FoundryError(f"slot {slot} ({op}): the capture has {count} frontier nodes after its placeholder")
            self.nodes[slot] = (int(graph), int(deps[0]))
        return slot

    def placed(self, graph: int) -> list[tuple[schema.SlotSpec, int]]:
        """(description, placeholder node) of every slot captured into CUgraph ``graph``, in slot order."""
        return [(self.specs[i], node) for i, (g, node) in sorted(self.nodes.items()) if g == graph]


def check_fillable(m: schema.Manifest, slot_ids: dict[int, list[int]], filler) -> dict[int, schema.SlotSpec]:
    """Before anything is built: every slot of every graph (graph index -> slot ids in node order) has a
    description, and there is a filler. Returns the descriptions by id."""
    spec_of = {s.id: s for s in m.slots}
    for index, ids in slot_ids.items():
        key = m.graphs[index].key
        missing = [i for i in ids if i not in spec_of]
        if missing:
            raise ArchiveError(f"graph {key!r}: slot {missing[0]} has no description in the manifest")
        if filler is None:
            raise UnfilledSlot(f"graph {key!r} holds {len(ids)} placeholder(s) (first: slot {ids[0]}, "
                               f"{spec_of[ids[0]].op}) and restore() got no slot filler; refusing to instantiate it")
    return spec_of


def check_slot_specs(specs: Sequence[schema.SlotSpec], lo: int, hi: int) -> None:
    """LOAD: every address a slot reads or writes lies inside the arena ``[lo, hi)``."""
    for s in specs:
        for what, addr, size in (("send", s.send, s.send_bytes), ("recv", s.recv, s.recv_bytes)):
            if size and not (lo <= addr and addr + size <= hi):
                raise FoundryError(f"slot {s.id} ({s.op}): {what} buffer {addr:#x}+{size} lies outside the arena")


def fill_slots(graph: int, slot_nodes: Sequence[int], specs: Sequence[schema.SlotSpec], filler: SlotFiller,
               stream, key: str) -> float:
    """Capture each slot's real work into ``graph`` between its two empty nodes; returns seconds spent.

    ``slot_nodes`` holds (in-node, out-node) pairs in node order; ``specs`` the matching descriptions. One
    capture sequence per graph, as a live capture would be (libraries such as NCCL keep per-capture state);
    before each slot the stream's capture dependencies are set to that slot's in-node. Runs on the calling
    thread; every rank must call it in the same order (collectives match by order).
    """
    import torch
    from cuda.bindings import driver as drv

    t0 = time.perf_counter()
    if not specs:
        return 0.0
    g = drv.CUgraph(graph)
    s = drv.CUstream(stream.cuda_stream)
    relaxed = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
    set_deps = int(drv.CUstreamUpdateCaptureDependencies_flags.CU_STREAM_SET_CAPTURE_DEPENDENCIES)
    first_in = drv.CUgraphNode(slot_nodes[0])
    check(drv.cuStreamBeginCaptureToGraph(s, g, [first_in], None, 1, relaxed), "cuStreamBeginCaptureToGraph")
    try:
        with torch.cuda.stream(stream):
            for k, spec in enumerate(specs):
                node_in, node_out = drv.CUgraphNode(slot_nodes[2 * k]), drv.CUgraphNode(slot_nodes[2 * k + 1])
                if k:
                    check(drv.cuStreamUpdateCaptureDependencies(s, [node_in], None, 1, set_deps),
                           "cuStreamUpdateCaptureDependencies")
                filler(spec)
                info = check(drv.cuStreamGetCaptureInfo(s), "cuStreamGetCaptureInfo")  # status, ..., deps, count
                leaves, count = list(info[3])[: int(info[-1])], int(info[-1])
                if not count:
                    leaves = [node_in]
                check(drv.cuGraphAddDependencies(g, leaves, [node_out] * len(leaves), None, len(leaves)),
                       f"graph {key!r}: joining slot {spec.id}")
    finally:
        err = drv.cuStreamEndCapture(s)
    check(err, f"graph {key!r}: cuStreamEndCapture")
    return time.perf_counter() - t0


def fill_captured(graph, recorder: SlotRecorder, filler: SlotFiller, key: str = "") -> int:
    """SAVE side: give the process that captured ``graph`` (a ``torch.cuda.CUDAGraph`` made with
    ``keep_graph=True``) the real work of its placeholders, then instantiate it again; returns the number filled.

    Each placeholder node becomes the empty in/out pair LOAD builds (``_native/restore.c``), ``filler`` captures the
    work between them exactly as at LOAD, and the graph is re-instantiated, so PyTorch's ``replay()`` (the caller's
    own replay path, RNG bookkeeping included) runs the filled graph. Call it after ``Session.save()`` has read the
    graph. Every rank calls it for the same graphs in the same order (collectives match by order).
    """
    import torch

    raw = int(graph.raw_cuda_graph())
    placed = recorder.placed(raw)
    if not placed:
        return 0
    lib = native_lib()
    err = ctypes.create_string_buffer(512)
    nodes = (ctypes.c_void_p * 2)()
    pairs: list[int] = []
    for spec, node in placed:
        if lib.foundry_split_node(raw, node, nodes, err, len(err)) != 0:
            raise FoundryError(f"graph {key!r}, slot {spec.id}: {err.value.decode(errors='replace')}")
        pairs += [int(nodes[0]), int(nodes[1])]
    stream = torch.cuda.Stream()
    fill_slots(raw, pairs, [spec for spec, _ in placed], filler, stream, key)
    stream.synchronize()
    graph.instantiate()
    return len(placed)
