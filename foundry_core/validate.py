"""LOAD-time checks of an archive against itself and its arena: every index, offset, size and address.

SAVE writes consistent tables, but an archive is a file that anyone with write access can change, and LOAD hands
its contents to native code and the GPU. So LOAD re-checks everything SAVE guaranteed and a check can see: table
indices and sizes, payload bounds, memset and memcpy targets (device memory inside the arena), snapshot, output,
RNG and slot addresses (inside the memory LOAD restores; ``layout.check_addresses`` does the first three), and
the child-graph references between graphs (no cycles, bounded depth). ``_native/restore.c`` checks the table
bounds once more before it builds.

What no check can see is what a kernel does with its arguments: an archive is code (docs/SECURITY.md).
Every problem raises :class:`~foundry_core.errors.ArchiveError` with one line naming the graph, node and field.
"""
from __future__ import annotations

import numpy as np

from foundry_core import codec, layout, schema
from foundry_core.errors import ArchiveError

__all__ = ["check_manifest", "check_graph_tables", "check_child_graphs", "restored_range"]

#: sizeof(CUDA_MEMCPY3D) on 64-bit platforms; ``restore.c`` refuses any other payload size for memcpy nodes too.
MEMCPY3D_SIZE = 200
CU_MEMORYTYPE_DEVICE = 2
#: Launch attributes SAVE carries over; any other id in an archive is tampering.
KERNEL_NODE_ATTRIBUTES = frozenset(codec.KERNEL_NODE_ATTRIBUTES)
MAX_EVENTS = 1 << 20
MAX_CHILD_DEPTH = 64
MAX_TENSOR_DIMS = 64
MAX_MODULE_VARIABLE = 1 << 26  # bytes of one relocated module variable (cuBLAS's constants are 112)
# Word indices of the CUDA_MEMCPY3D fields we check (the struct is 25 eight-byte words on 64-bit Linux).
_SRC_X, _SRC_Y, _SRC_Z, _SRC_TYPE, _SRC_DEVICE, _SRC_PITCH, _SRC_HEIGHT = 0, 1, 2, 4, 6, 9, 10
_DST_X, _DST_Y, _DST_Z, _DST_TYPE, _DST_DEVICE, _DST_PITCH, _DST_HEIGHT = 11, 12, 13, 15, 17, 20, 21
_WIDTH, _HEIGHT, _DEPTH = 22, 23, 24
_NO_PAYLOAD = (schema.NODE_EMPTY, schema.NODE_EVENT_RECORD, schema.NODE_EVENT_WAIT, schema.NODE_CHILD_GRAPH,
               schema.NODE_SLOT)


def restored_range(m: schema.Manifest) -> tuple[int, int]:
    """[lo, hi) of device memory that exists after LOAD: the arena up to the end of the capture region."""
    return m.arena.base, m.arena.base + m.arena.capture_end


def check_manifest(where: str, m: schema.Manifest) -> None:
    """Arena, events, outputs, snapshots, RNG state and slots of a decoded manifest (indices and blob bounds are
    archive.py's; snapshot, output and RNG addresses are ``layout.check_addresses``'s)."""
    arena = m.arena
    if arena.base < 0 or arena.size <= 0 or arena.base + arena.size > 2**64 or arena.granularity <= 0:
        raise ArchiveError(f"{where}: arena {arena.base:#x}+{arena.size:#x} (granularity {arena.granularity}) "
                           "is not a valid address range")
    nodes = sum(m.templates[g.template].num_nodes for g in m.graphs)  # template indices are checked already
    if not 0 <= m.num_events <= min(MAX_EVENTS, max(nodes, 0)):
        raise ArchiveError(f"{where}: {m.num_events} events for {nodes} nodes (corrupt)")
    for graph in m.graphs:
        for j, spec in enumerate(graph.outputs):
            if len(spec.shape) > MAX_TENSOR_DIMS:
                raise ArchiveError(f"{where}: graph {graph.key[:60]!r} output {j} has {len(spec.shape)} dimensions")
    layout.check_addresses(m, where)
    for var in m.module_variables:
        what = f"{where}: module variable {var.name[:60]!r}"
        if not 0 < var.size <= MAX_MODULE_VARIABLE:
            raise ArchiveError(f"{what} has size {var.size}")
        if var.value and m.blobs[var.value].size != var.size:
            raise ArchiveError(f"{what}: its value blob holds {m.blobs[var.value].size} bytes for {var.size}")
        for _, offset, inside in var.refs:
            if offset < 0 or offset % 8 or not 0 <= inside < var.size:
                raise ArchiveError(f"{what}: reference at payload byte {offset} (+{inside}) is not an aligned word "
                                   "pointing inside it")
    _check_ranks(where, m)
    lo, hi = restored_range(m)
    if len({s.id for s in m.slots}) != len(m.slots):
        raise ArchiveError(f"{where}: two slot descriptions share an id")
    for s in m.slots:
        for what, address, size in (("send", s.send, s.send_bytes), ("recv", s.recv, s.recv_bytes)):
            if size < 0 or (size and not lo <= address <= address + size <= hi):
                raise ArchiveError(f"{where}: slot {s.id} ({s.op[:40]}) {what} buffer {address:#x}+{size} lies "
                                   f"outside the arena's restored memory [{lo:#x}, {hi:#x})")


def _check_ranks(where: str, m: schema.Manifest) -> None:
    """A rank template: each rank 1..world_size-1 at most once, by a delta or by a variant; a delta's base is rank 0
    or a variant, and each of its patches aims at exactly one graph or snapshot of that base (LOAD would otherwise
    ignore it silently); each variant passes these checks itself, read as its rank's manifest."""
    if m.ranks is None:
        return
    world = m.ranks.world_size
    if world < 1:
        raise ArchiveError(f"{where}: rank template for {world} ranks")
    ranks = [d.rank for d in m.ranks.deltas] + [v.rank for v in m.ranks.variants]
    if len(set(ranks)) != len(ranks) or not all(1 <= r < world for r in ranks):
        raise ArchiveError(f"{where}: rank template deltas and variants for ranks {sorted(ranks)[:8]}; expected each "
                           f"of 1..{world - 1} at most once")
    variants = {v.rank: v.manifest for v in m.ranks.variants}
    for delta in m.ranks.deltas:
        if delta.base and delta.base not in variants:
            raise ArchiveError(f"{where}: rank {delta.rank}'s delta applies to rank {delta.base}, which is not stored "
                               "as a variant")
        base = variants[delta.base] if delta.base else m
        for p in delta.patches:
            if (p.graph >= 0) == (p.snapshot >= 0) or p.graph >= len(base.graphs) or p.snapshot >= len(base.snapshots):
                raise ArchiveError(f"{where}: rank {delta.rank} patch at {p.offset} is for graph {p.graph} and "
                                   f"snapshot {p.snapshot}; its base has {len(base.graphs)} graphs and "
                                   f"{len(base.snapshots)} snapshots, and a patch is for exactly one of them")
    for rank in variants:
        check_manifest(f"{where}: rank {rank}'s variant", schema.for_rank(m, rank))


def check_graph_tables(where: str, m: schema.Manifest, index: int, nodes: np.ndarray, payload: np.ndarray,
                       attrs: np.ndarray, edges: np.ndarray, allow_foreign_pointers: bool = False) -> None:
    """Every node's kind, table indices, payload bounds and memory targets, and every edge, of graph ``index``.

    ``where`` names the archive and graph. ``allow_foreign_pointers`` (``Options.allow_foreign_pointers``, the
    switch under which SAVE allowed them): memset/memcpy targets outside the arena pass. Vectorised: LOAD runs
    this on every node of every graph.
    """
    kinds = nodes["kind"]
    names = schema.NODE_KIND_NAMES

    def fail(mask: np.ndarray, what: str) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            kind = names.get(int(kinds[i]), f"kind {int(kinds[i])}")
            raise ArchiveError(f"{where} node {i} ({kind}): {what(i) if callable(what) else what}")

    fail(~np.isin(kinds, list(names)), "unknown node kind")
    size = np.uint64(len(payload))
    off, length = nodes["payload_off"], nodes["payload_len"].astype(np.uint64)
    room = np.where(off <= size, size - np.minimum(off, size), np.uint64(0))
    fail((off > size) | (length > room),
         lambda i: f"payload {int(off[i])}+{int(length[i])} lies outside the {len(payload)}-byte payload table")
    fail((length > 0) & (off % np.uint64(8) != 0), lambda i: f"payload offset {int(off[i])} is not 8-byte aligned")
    fail(np.isin(kinds, _NO_PAYLOAD) & (length > 0), lambda i: f"has a {int(length[i])}-byte payload; it takes none")

    refs = nodes["ref"]
    kernel = kinds == schema.NODE_KERNEL
    fail(kernel & (refs >= len(m.functions)), lambda i: f"refers to kernel {int(refs[i])} of {len(m.functions)}")
    attr_end = nodes["attr_off"].astype(np.uint64) + nodes["attr_cnt"]
    fail(kernel & (attr_end > len(attrs)),
         lambda i: f"launch attributes {int(nodes['attr_off'][i])}+{int(nodes['attr_cnt'][i])} lie outside the "
                   f"{len(attrs)}-entry attribute table")
    fail(~kernel & (nodes["attr_cnt"] > 0), "has launch attributes; only kernel nodes take them")
    unknown_attr = ~np.isin(attrs["id"], list(KERNEL_NODE_ATTRIBUTES))
    if unknown_attr.any():
        raise ArchiveError(f"{where}: launch attribute {int(attrs['id'][np.argmax(unknown_attr)])} is not one "
                           "foundry saves")
    event = (kinds == schema.NODE_EVENT_RECORD) | (kinds == schema.NODE_EVENT_WAIT)
    fail(event & (refs >= m.num_events), lambda i: f"refers to event {int(refs[i])} of {m.num_events}")
    child = kinds == schema.NODE_CHILD_GRAPH
    fail(child & ((refs >= len(m.graphs)) | (refs == index)),
         lambda i: f"refers to child graph {int(refs[i])} of {len(m.graphs)}")
    for i in np.nonzero(child)[0].tolist():
        if not m.graphs[int(refs[i])].is_child:
            raise ArchiveError(f"{where} node {i} (child_graph): graph {int(refs[i])} is not a child graph")
    slot = kinds == schema.NODE_SLOT
    if slot.any():
        ids = {s.id for s in m.slots}
        fail(slot & ~np.isin(refs, list(ids)), lambda i: f"refers to slot {int(refs[i])}, which the manifest does "
                                                         "not describe")
        fail(slot & m.graphs[index].is_child, "slot nodes may not sit inside a child graph")

    lo, hi = restored_range(m)
    if allow_foreign_pointers:
        lo, hi = 0, 2**64
    memset = kinds == schema.NODE_MEMSET
    fail(memset & (length != schema.MEMSET_DTYPE.itemsize),
         lambda i: f"memset payload is {int(length[i])} bytes, not a {schema.MEMSET_DTYPE.itemsize}-byte record")
    for i in np.nonzero(memset)[0].tolist():
        _check_memset(f"{where} node {i} (memset)", payload, int(off[i]), lo, hi)
    memcpy = kinds == schema.NODE_MEMCPY
    fail(memcpy & (length != MEMCPY3D_SIZE),
         lambda i: f"memcpy payload is {int(length[i])} bytes, not a {MEMCPY3D_SIZE}-byte CUDA_MEMCPY3D")
    for i in np.nonzero(memcpy)[0].tolist():
        _check_memcpy(f"{where} node {i} (memcpy)", payload, int(off[i]), lo, hi)
    _check_variable_refs(where, m, index, nodes)

    src, dst = edges["src"], edges["dst"]
    bad = (src >= dst) | (dst >= len(nodes))
    if bad.any():
        e = int(np.argmax(bad))
        raise ArchiveError(f"{where}: edge {e} ({int(src[e])} -> {int(dst[e])}) does not point forward to one of "
                           f"the {len(nodes)} nodes")


def _check_variable_refs(where: str, m: schema.Manifest, index: int, nodes: np.ndarray) -> None:
    """Relocated argument words (Manifest.module_variables) of graph ``index`` lie inside kernel arguments."""
    offsets = [(off, var.name) for var in m.module_variables for g, off, _ in var.refs if g == index]
    if not offsets:
        return
    kernel = nodes[nodes["kind"] == schema.NODE_KERNEL]
    order = np.argsort(kernel["payload_off"])
    starts = kernel["payload_off"][order].astype(np.int64)
    ends = starts + kernel["payload_len"][order].astype(np.int64)
    for off, name in offsets:
        k = int(np.searchsorted(starts, off, side="right")) - 1
        if k < 0 or off + 8 > ends[k]:
            raise ArchiveError(f"{where}: module variable {name[:60]!r} is referenced at payload byte {off}, "
                               "outside every kernel's arguments")


def _inside(where: str, what: str, start: int, end: int, lo: int, hi: int) -> None:
    if not lo <= start <= end <= hi:
        raise ArchiveError(f"{where}: {what} {start:#x}..{end:#x} lies outside the arena's restored memory "
                           f"[{lo:#x}, {hi:#x})")


def _check_memset(where: str, payload: np.ndarray, off: int, lo: int, hi: int) -> None:
    rec = np.frombuffer(payload, schema.MEMSET_DTYPE, count=1, offset=off)[0]
    dst, pitch, width, height = int(rec["dst"]), int(rec["pitch"]), int(rec["width"]), int(rec["height"])
    element = int(rec["element_size"])
    if element not in (1, 2, 4) or height < 1:
        raise ArchiveError(f"{where}: element size {element}, height {height} (expected 1, 2 or 4 and >= 1)")
    row = width * element
    if height > 1 and pitch < row:
        raise ArchiveError(f"{where}: pitch {pitch} is smaller than a row of {row} bytes")
    _inside(where, "target", dst, dst + pitch * (height - 1) + row, lo, hi)


def _check_memcpy(where: str, payload: np.ndarray, off: int, lo: int, hi: int) -> None:
    w = [int(x) for x in np.frombuffer(payload, "<u8", count=MEMCPY3D_SIZE // 8, offset=off)]
    src_type, dst_type = w[_SRC_TYPE] & 0xFFFFFFFF, w[_DST_TYPE] & 0xFFFFFFFF
    if src_type != CU_MEMORYTYPE_DEVICE or dst_type != CU_MEMORYTYPE_DEVICE:
        raise ArchiveError(f"{where}: copies memory types {src_type} -> {dst_type}; only device-to-device copies "
                           "are restored")
    width, height, depth = w[_WIDTH], w[_HEIGHT], w[_DEPTH]
    if not (width and height and depth):
        return  # copies nothing
    for side, (x, y, z, base, pitch, rows) in (
        ("source", (w[_SRC_X], w[_SRC_Y], w[_SRC_Z], w[_SRC_DEVICE], w[_SRC_PITCH], w[_SRC_HEIGHT])),
        ("destination", (w[_DST_X], w[_DST_Y], w[_DST_Z], w[_DST_DEVICE], w[_DST_PITCH], w[_DST_HEIGHT])),
    ):
        if (height > 1 or depth > 1) and pitch < x + width:
            raise ArchiveError(f"{where}: {side} pitch {pitch} is smaller than a row of {x + width} bytes")
        if depth > 1 and rows < y + height:
            raise ArchiveError(f"{where}: {side} height {rows} is smaller than {y + height} rows")
        start = base + z * pitch * rows + y * pitch + x
        _inside(where, side, start, start + (depth - 1) * pitch * rows + (height - 1) * pitch + width, lo, hi)


def check_child_graphs(where: str, m: schema.Manifest, child_refs: dict[int, list[int]]) -> None:
    """Child-graph references between graphs form no cycle and nest at most ``MAX_CHILD_DEPTH`` deep.

    ``child_refs`` maps a graph index to the graph indices of its child nodes (already range-checked).
    """
    depth: dict[int, int] = {}  # graph -> nesting depth below it, once known
    for root in child_refs:
        if root in depth:
            continue
        stack, on_path = [(root, iter(child_refs.get(root, ())))], {root}
        while stack:
            graph, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(graph)
                depth[graph] = 1 + max((depth[c] for c in child_refs.get(graph, ())), default=0)
                if depth[graph] > MAX_CHILD_DEPTH:
                    raise ArchiveError(f"{where}: child graphs of graph {m.graphs[graph].key[:60]!r} nest deeper "
                                       f"than {MAX_CHILD_DEPTH}")
            elif child in on_path:
                raise ArchiveError(f"{where}: graph {m.graphs[graph].key[:60]!r} contains itself through child "
                                   f"graph {child} (a cycle)")
            elif child not in depth:
                stack.append((child, iter(child_refs.get(child, ()))))
                on_path.add(child)
