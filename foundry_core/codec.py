"""Graph codec: read a captured CUDA graph through ``cuda.bindings.driver`` into packed records (SAVE).

The records are the ones ``schema.py`` defines and ``_native/restore.c`` rebuilds from. Reading happens once at
SAVE, so it is plain Python; the pure parts (topological order, argument packing, ``extra`` parsing) are
separate functions so they can be tested without a GPU.

What is refused here, at SAVE, never discovered at LOAD: host callbacks, memory alloc/free nodes, conditional
nodes, external semaphores, batch mem-ops, and memcpy nodes that touch host memory.
"""
from __future__ import annotations

import ctypes
import hashlib
import heapq
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from foundry_core import schema
from foundry_core.errors import DriverError, UnsupportedGraph
from foundry_core.native import check, native_lib

log = logging.getLogger("foundry_core.codec")

# CUgraphNodeType values (driver enum) and the names we use in messages.
_CU_NODE_TYPES = {
    0: "kernel", 1: "memcpy", 2: "memset", 3: "host callback", 4: "child graph", 5: "empty", 6: "event wait",
    7: "event record", 8: "external semaphore signal", 9: "external semaphore wait", 10: "memory alloc",
    11: "memory free", 12: "batch mem-op", 13: "conditional",
}
#: Launch attributes valid on kernel nodes that we carry over when set (non-zero).
KERNEL_NODE_ATTRIBUTES = (1, 2, 4, 5, 8, 9, 10, 11, 13, 16)

CU_LAUNCH_PARAM_END = 0
CU_LAUNCH_PARAM_BUFFER_POINTER = 1
CU_LAUNCH_PARAM_BUFFER_SIZE = 2


class KernelNodeParams(ctypes.Structure):
    """Host layout of CUDA_KERNEL_NODE_PARAMS_v2 (read through the binding's struct pointer)."""

    _fields_ = [
        ("func", ctypes.c_void_p),
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("smem", ctypes.c_uint),
        ("kernelParams", ctypes.c_void_p),
        ("extra", ctypes.c_void_p),
        ("kern", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------


def topological_order(num_nodes: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Kahn's order, ties broken by original index (stable, deterministic). Raises ValueError on a cycle."""
    indeg = np.zeros(num_nodes, dtype=np.int64)
    np.add.at(indeg, dst, 1)
    succ: list[list[int]] = [[] for _ in range(num_nodes)]
    for s, d in zip(src.tolist(), dst.tolist()):
        succ[s].append(d)
    heap = [i for i in range(num_nodes) if indeg[i] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(heap, j)
    if len(order) != num_nodes:
        raise ValueError(f"graph has a cycle ({num_nodes - len(order)} nodes unreachable in topological order)")
    return np.asarray(order, dtype=np.int64)


def pack_kernel_params(layout: list[tuple[int, int]], pointers: list[int], read: Callable[[int, int], bytes]) -> bytes:
    """Pack per-parameter values (``kernelParams[i]`` points to parameter i) into the device parameter layout."""
    if not layout:
        return b""
    total = max(off + size for off, size in layout)
    buf = bytearray(total)
    for (off, size), ptr in zip(layout, pointers):
        if not ptr:
            raise ValueError(f"kernelParams entry at offset {off} is NULL")
        buf[off : off + size] = read(ptr, size)
    return bytes(buf)


def parse_extra(words: Callable[[int], int]) -> tuple[int, int]:
    """Parse a launch ``extra`` array given ``words(i)`` -> i-th void* value. Returns (buffer address, size)."""
    buf = size_ptr = None
    for i in range(0, 64, 2):
        tag = words(i)
        if tag == CU_LAUNCH_PARAM_END:
            break
        if tag == CU_LAUNCH_PARAM_BUFFER_POINTER:
            buf = words(i + 1)
        elif tag == CU_LAUNCH_PARAM_BUFFER_SIZE:
            size_ptr = words(i + 1)
        else:
            raise ValueError(f"unknown launch 'extra' tag {tag:#x}")
    else:
        raise ValueError("launch 'extra' array is not terminated")
    if buf is None or size_ptr is None:
        raise ValueError("launch 'extra' lacks BUFFER_POINTER or BUFFER_SIZE")
    return buf, size_ptr


def template_identity(kinds: np.ndarray, edges: np.ndarray) -> str:
    """Identity of a graph's topology: node kinds and edges with their data. Kernels, launch shapes and
    arguments are per graph (batch sizes pick different GEMM kernels), so they are not part of it."""
    h = hashlib.sha256()
    for a in (kinds, edges):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def host_read(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size)


def host_word(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


# ---------------------------------------------------------------------------------------------------------------
# Reading a live graph
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DecodedGraph:
    nodes: np.ndarray  # NODE_DTYPE, topological order; kernel ref = index into `functions`
    payload: bytes
    attrs: np.ndarray  # ATTR_DTYPE
    edges: np.ndarray  # EDGE_DTYPE, indices in topological order
    functions: list[int]  # CUfunction handles, local table
    events: list[int]  # CUevent handles, local table
    children: list["DecodedGraph"] = field(default_factory=list)

    @property
    def num_kernel_nodes(self) -> int:
        return int((self.nodes["kind"] == schema.NODE_KERNEL).sum())


class GraphReader:
    """Reads CUgraphs with cuda.bindings.driver; caches per-function parameter layouts and names."""

    def __init__(self, slot_function: Optional[int] = None):
        from cuda.bindings import driver

        self.drv = driver
        self.slot_function = slot_function  # CUfunction of foundry_core.slots' placeholder, if any
        self._layouts: dict[int, list[tuple[int, int]]] = {}
        self._names: dict[int, str] = {}
        self.memcpy3d_size: Optional[int] = None

    # -- function metadata -----------------------------------------------------------------------------------
    def function_name(self, func: int) -> str:
        if func not in self._names:
            err, name = self.drv.cuFuncGetName(self.drv.CUfunction(func))
            self._names[func] = name.decode() if int(err) == 0 else f"<function {func:#x}>"
        return self._names[func]

    def param_layout(self, func: int) -> list[tuple[int, int]]:
        if func not in self._layouts:
            layout = []
            f = self.drv.CUfunction(func)
            while True:
                err, off, size = self.drv.cuFuncGetParamInfo(f, len(layout))
                if int(err) != 0:
                    break
                layout.append((int(off), int(size)))
            self._layouts[func] = layout
        return self._layouts[func]

    def _edges(self, g, index: dict[int, int], graph_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edges as (src, dst) node indices and their data (from_port, to_port, type), read through the native
        helper: cuda-python's cuGraphGetEdges returns edge data over freed memory (NVIDIA/cuda-python#1804), and a
        programmatic (PDL) edge read back as a plain one, or on the wrong edge, restores to wrong results."""
        lib = native_lib()
        n = ctypes.c_size_t(0)
        rc = lib.foundry_graph_edges(int(g), None, None, None, ctypes.byref(n))
        if rc:
            raise DriverError(f"{graph_name}: cuGraphGetEdges failed (CUresult {rc})", str(rc))
        frm, to = np.zeros(n.value, np.uint64), np.zeros(n.value, np.uint64)
        data = np.zeros((n.value, 8), np.uint8)  # CUgraphEdgeData: from_port, to_port, type, reserved[5]
        if n.value:
            want = n.value
            rc = lib.foundry_graph_edges(int(g), frm.ctypes.data, to.ctypes.data, data.ctypes.data, ctypes.byref(n))
            if rc or n.value != want:
                raise DriverError(f"{graph_name}: cuGraphGetEdges failed (CUresult {rc}, {n.value} of {want} edges)",
                                  str(rc))
        src = np.fromiter((index[int(x)] for x in frm), np.int64, len(frm))
        dst = np.fromiter((index[int(x)] for x in to), np.int64, len(to))
        return src, dst, data[:, :3].copy()

    # -- graph --------------------------------------------------------------------------------------------------
    def read(self, graph, graph_name: str = "graph") -> DecodedGraph:
        drv = self.drv
        g = graph if isinstance(graph, drv.CUgraph) else drv.CUgraph(int(graph))
        _, count = check(drv.cuGraphGetNodes(g, 0), "cuGraphGetNodes")
        raw_nodes, count = check(drv.cuGraphGetNodes(g, count), "cuGraphGetNodes")
        index = {int(n): i for i, n in enumerate(raw_nodes[:count])}
        src, dst, edata = self._edges(g, index, graph_name)
        order = topological_order(count, src, dst)
        position = np.empty(count, np.int64)
        position[order] = np.arange(count)

        nodes = np.zeros(count, schema.NODE_DTYPE)
        payload = bytearray()
        attrs: list[tuple[int, bytes]] = []
        functions: list[int] = []
        func_index: dict[int, int] = {}
        events: list[int] = []
        event_index: dict[int, int] = {}
        children: list[DecodedGraph] = []

        def add_payload(data: bytes) -> tuple[int, int]:
            off = len(payload)
            payload.extend(data)
            payload.extend(b"\0" * (-len(payload) % 8))  # keep every buffer 8-byte aligned
            return off, len(data)

        for pos, orig in enumerate(order.tolist()):
            node = raw_nodes[orig]
            ntype = int(check(drv.cuGraphNodeGetType(node), "cuGraphNodeGetType"))
            rec = nodes[pos]
            if ntype == 0:  # kernel
                rec["kind"] = schema.NODE_KERNEL
                params = check(drv.cuGraphKernelNodeGetParams(node), "cuGraphKernelNodeGetParams")
                kp = KernelNodeParams.from_address(int(params.getPtr()))
                func = kp.func
                if not func and kp.kern:
                    func = int(check(drv.cuKernelGetFunction(drv.CUkernel(kp.kern)), "cuKernelGetFunction"))
                if not func:
                    raise UnsupportedGraph(
                        f"{graph_name}: kernel node {pos} has neither a function nor a kernel handle")
                args = self._kernel_args(func, kp, graph_name, pos)
                if self.slot_function is not None and func == self.slot_function:
                    rec["kind"] = schema.NODE_SLOT  # a placeholder: its only argument is the slot id
                    rec["ref"] = int.from_bytes(args[:8], "little")
                    continue
                rec["payload_off"], rec["payload_len"] = add_payload(args)
                if func not in func_index:
                    func_index[func] = len(functions)
                    functions.append(func)
                rec["ref"] = func_index[func]
                rec["grid"] = tuple(kp.grid)
                rec["block"] = tuple(kp.block)
                rec["smem"] = kp.smem
                rec["attr_off"] = len(attrs)
                for attr_id in KERNEL_NODE_ATTRIBUTES:
                    err, value = drv.cuGraphKernelNodeGetAttribute(node, drv.CUkernelNodeAttrID(attr_id))
                    if int(err) == 0:
                        raw = ctypes.string_at(int(value.getPtr()), 64)
                        if any(raw):
                            attrs.append((attr_id, raw))
                rec["attr_cnt"] = len(attrs) - int(rec["attr_off"])
            elif ntype == 2:  # memset
                rec["kind"] = schema.NODE_MEMSET
                p = check(drv.cuGraphMemsetNodeGetParams(node), "cuGraphMemsetNodeGetParams")
                m = np.zeros(1, schema.MEMSET_DTYPE)
                m["dst"], m["pitch"], m["value"] = int(p.dst), p.pitch, p.value
                m["element_size"], m["width"], m["height"] = p.elementSize, p.width, p.height
                rec["payload_off"], rec["payload_len"] = add_payload(m.tobytes())
            elif ntype == 1:  # memcpy
                rec["kind"] = schema.NODE_MEMCPY
                p = check(drv.cuGraphMemcpyNodeGetParams(node), "cuGraphMemcpyNodeGetParams")
                device_types = (int(drv.CUmemorytype.CU_MEMORYTYPE_DEVICE),)
                if int(p.srcMemoryType) not in device_types or int(p.dstMemoryType) not in device_types:
                    raise UnsupportedGraph(
                        f"{graph_name}: memcpy node {pos} copies to or from host memory "
                        f"(src type {int(p.srcMemoryType)}, dst type {int(p.dstMemoryType)}); host buffers are not "
                        "restored — keep host<->device copies outside the graph"
                    )
                size = self.memcpy3d_size or 200
                rec["payload_off"], rec["payload_len"] = add_payload(ctypes.string_at(int(p.getPtr()), size))
            elif ntype == 5:
                rec["kind"] = schema.NODE_EMPTY
            elif ntype in (6, 7):
                rec["kind"] = schema.NODE_EVENT_WAIT if ntype == 6 else schema.NODE_EVENT_RECORD
                getter = drv.cuGraphEventWaitNodeGetEvent if ntype == 6 else drv.cuGraphEventRecordNodeGetEvent
                ev = int(check(getter(node), "event node get event"))
                if ev not in event_index:
                    event_index[ev] = len(events)
                    events.append(ev)
                rec["ref"] = event_index[ev]
            elif ntype == 4:
                rec["kind"] = schema.NODE_CHILD_GRAPH
                child = check(drv.cuGraphChildGraphNodeGetGraph(node), "cuGraphChildGraphNodeGetGraph")
                rec["ref"] = len(children)
                children.append(self.read(child, f"{graph_name}/child{len(children)}"))
            else:
                raise UnsupportedGraph(
                    f"{graph_name}: node {pos} is a {_CU_NODE_TYPES.get(ntype, f'type-{ntype}')} node, which cannot be "
                    f"restored; it follows {self._previous_kernel(nodes, functions, pos)} — "
                    "remove it from the captured region"
                )

        edges = np.zeros(len(src), schema.EDGE_DTYPE)
        if len(src):
            edges["src"] = position[src]
            edges["dst"] = position[dst]
            edges["from_port"], edges["to_port"], edges["type"] = edata[:, 0], edata[:, 1], edata[:, 2]
            edges.sort(order=("dst", "src"))
        attr_arr = np.zeros(len(attrs), schema.ATTR_DTYPE)
        for i, (aid, raw) in enumerate(attrs):
            attr_arr[i]["id"] = aid
            attr_arr[i]["value"] = np.frombuffer(raw, np.uint8)
        return DecodedGraph(nodes, bytes(payload), attr_arr, edges, functions, events, children)

    def _previous_kernel(self, nodes, functions, pos: int) -> str:
        for p in range(pos - 1, -1, -1):
            if nodes[p]["kind"] == schema.NODE_KERNEL:
                return f"kernel '{self.function_name(functions[int(nodes[p]['ref'])])}' (node {p})"
        return "the start of the graph"

    def _kernel_args(self, func: int, kp: KernelNodeParams, graph_name: str, pos: int) -> bytes:
        if kp.kernelParams:
            layout = self.param_layout(func)
            ptrs = [host_word(kp.kernelParams + 8 * i) for i in range(len(layout))]
            return pack_kernel_params(layout, ptrs, host_read)
        if kp.extra:
            buf, size_ptr = parse_extra(lambda i: host_word(kp.extra + 8 * i))
            size = host_word(size_ptr)
            return host_read(buf, size) if size else b""
        if self.param_layout(func):
            raise UnsupportedGraph(
                f"{graph_name}: kernel node {pos} ('{self.function_name(func)}') has parameters but neither "
                "kernelParams nor extra"
            )
        return b""
