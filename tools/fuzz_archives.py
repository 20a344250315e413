"""Fuzz everything LOAD checks before a GPU or native code acts on an archive, with corrupted archives.

    python3 tools/fuzz_archives.py --cases 10000          # the long run (a few minutes on 2 cores)
    python3 tools/fuzz_archives.py --case 1234 -v         # re-run one case and print what it did

Every case starts from a realistic archive (kernels, memset, memcpy, events, a child graph, snapshots, outputs
with a pytree structure) and corrupts it: manifest fields (odd types, boundary integers, nesting thousands deep,
deletions), the node, payload, attribute and edge tables, or sizes: declared sizes of blobs, zlib streams that
inflate to more or less than declared, zlib bombs (up to the decompression budget each, in several blobs), and
one blob named by many records. Blobs are re-stored with valid sha256s, as a deliberate tamperer would, so the
corruption reaches the consistency checks instead of stopping at the hashes.
Each case then runs the CPU side of LOAD for every rank of its rank template (``restore.check_archive_offline``:
container, manifest, addresses, the decompression budget, every table with each rank's patches, child graphs,
output structures, the allocation trace) and, whether Python accepted the tables or not, the native builder's own
bounds check (``foundry_check_graph`` in ``_native/restore.c``) on the raw tables. Workers run with a
decompression budget of ``BUDGET`` bytes, and the memory a case takes is measured (peak RSS).

Outcomes: accepted, refused (a one-line FoundryError), or a defect: a crash (the checking process died), a hang
(no answer within ``--timeout`` seconds), any other exception, or a case that took more memory than
``MEMORY_LIMIT`` (what believing the archive may cost: the budget, twice, and working room). Exit status 1 when
there is a defect. ``tests/core/test_archive_fuzz_load.py`` runs a few hundred cases in CI.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from foundry_core import schema
from foundry_core.archive import HEADER, Archive, ArchiveWriter
from foundry_core.errors import FoundryError
from foundry_core.options import Options

ARENA_BASE = 0x6A00_0000_0000
ARENA_SIZE = 80 << 30
CAPTURE_START = 17 << 30
CAPTURE_END = CAPTURE_START + (6 << 20)
CAPTURE = ARENA_BASE + CAPTURE_START  # first address of the capture region
MEMCPY3D_SIZE = 200
CU_MEMORYTYPE_DEVICE = 2
#: The decompression budget workers run with (``Options.inflate_budget``), and the most memory one case may take.
BUDGET = 64 << 20
MEMORY_LIMIT = 2 * BUDGET + (32 << 20)
OPTIONS = Options(inflate_budget=BUDGET)

FINGERPRINT = schema.Fingerprint(
    gpu_name="NVIDIA H200", compute_capability="9.0", driver_version=13000, cuda_runtime="13.0",
    torch="2.11.0+cu130", triton="3.6.0", foundry="0.1.0", key="fuzz",
)


# -- a realistic archive ------------------------------------------------------------------------------------------


def memset_record(dst: int, width: int, height: int = 1, element_size: int = 4, value: int = 0) -> bytes:
    rec = np.zeros(1, schema.MEMSET_DTYPE)
    rec["dst"], rec["pitch"], rec["value"] = dst, width * element_size, value
    rec["element_size"], rec["width"], rec["height"] = element_size, width, height
    return rec.tobytes()


def memcpy3d_record(src: int, dst: int, nbytes: int, src_type: int = CU_MEMORYTYPE_DEVICE,
                    dst_type: int = CU_MEMORYTYPE_DEVICE) -> bytes:
    """A CUDA_MEMCPY3D as the driver lays it out on 64-bit Linux (25 eight-byte words)."""
    words = np.zeros(25, "<u8")
    words[4], words[6], words[9] = src_type, src, nbytes  # srcMemoryType, srcDevice, srcPitch
    words[15], words[17], words[20] = dst_type, dst, nbytes  # dstMemoryType, dstDevice, dstPitch
    words[22], words[23], words[24] = nbytes, 1, 1  # WidthInBytes, Height, Depth
    return words.tobytes()


def _tables(kinds: list[int], batch: int, child_ref: int = 0):
    """Node, payload, attribute and edge tables for a chain of nodes of the given kinds."""
    nodes = np.zeros(len(kinds), schema.NODE_DTYPE)
    payload = bytearray()
    attrs = []
    for i, kind in enumerate(kinds):
        nodes[i]["kind"] = kind
        data = b""
        if kind == schema.NODE_KERNEL:
            data = np.array([CAPTURE + 0x1000 * i, CAPTURE + 0x2000, batch], "<u8").tobytes()
            nodes[i]["ref"] = i % 3
            nodes[i]["grid"], nodes[i]["block"] = (batch, 1, 1), (128, 1, 1)
            nodes[i]["attr_off"], nodes[i]["attr_cnt"] = len(attrs), 1
            attrs.append(5 if i % 2 else 9)
        elif kind == schema.NODE_MEMSET:
            data = memset_record(CAPTURE + 0x10000, width=256 * batch)
        elif kind == schema.NODE_MEMCPY:
            data = memcpy3d_record(CAPTURE + 0x20000, CAPTURE + 0x30000, 512 * batch)
        elif kind == schema.NODE_CHILD_GRAPH:
            nodes[i]["ref"] = child_ref
        elif kind == schema.NODE_SLOT:
            nodes[i]["ref"] = 7 + batch  # a slot id of Manifest.slots
        if data:
            nodes[i]["payload_off"], nodes[i]["payload_len"] = len(payload), len(data)
            payload += data + bytes(-len(data) % 8)
    attr_table = np.zeros(len(attrs), schema.ATTR_DTYPE)
    attr_table["id"] = attrs
    attr_table["value"][:, 0] = 1
    edges = np.zeros(len(kinds) - 1, schema.EDGE_DTYPE)
    edges["src"], edges["dst"] = np.arange(len(kinds) - 1), np.arange(1, len(kinds))
    edges["from_port"][::3] = 1
    edges["type"][::3] = 1
    return nodes, bytes(payload), attr_table, edges


def write_realistic_archive(path: Path) -> None:
    """Two top-level graphs sharing a template (every node kind, a child graph, a slot, RNG state) and their child
    graph, with an allocation trace and a rank template (rank 1's patches)."""
    import torch
    from torch.utils import _pytree as pytree

    k = schema
    parent_kinds = [k.NODE_MEMSET, k.NODE_KERNEL, k.NODE_MEMCPY, k.NODE_EVENT_RECORD, k.NODE_KERNEL,
                    k.NODE_CHILD_GRAPH, k.NODE_EVENT_WAIT, k.NODE_EMPTY, k.NODE_SLOT, k.NODE_KERNEL]
    child_kinds = [k.NODE_KERNEL, k.NODE_KERNEL]
    tree = pytree.treespec_dumps(pytree.tree_flatten((torch.zeros(1), [torch.zeros(1)]))[1])
    with ArchiveWriter(path) as w:
        images = []
        for i, size in enumerate((2048, 1024)):
            data = b"\x7fELF" + bytes(range(256)) * (size // 256)
            sha = hashlib.sha256(data).hexdigest()
            images.append(schema.KernelImage(sha256=sha, blob=w.add_blob(f"image/{i}", data, compress=False),
                                             size=len(data), kernels=[f"k{i}a", f"k{i}b"]))
        functions = [schema.KernelFunction(image=0, name="k0a", attributes={8: 1024}),
                     schema.KernelFunction(image=0, name="k0b"), schema.KernelFunction(image=1, name="k1a")]
        templates, graphs = [], []
        for t, kinds in enumerate((parent_kinds, child_kinds)):
            edges = _tables(kinds, 1)[3]
            templates.append(schema.GraphTemplate(num_nodes=len(kinds), kinds_sha256=f"{t:064x}",
                                                  edges=w.add_blob(f"template/{t}/edges", edges.tobytes()),
                                                  num_edges=len(edges)))
        for g, (key, template, batch) in enumerate((("decode_bs1", 0, 1), ("decode_bs2", 0, 2),
                                                    ("decode_bs1/child0", 1, 1))):
            kinds = parent_kinds if template == 0 else child_kinds
            nodes, payload, attrs, _ = _tables(kinds, batch, child_ref=2)
            outputs = []
            if template == 0:
                outputs = [schema.TensorSpec(address=CAPTURE + 0x40000 * (g + 1) + 0x1000 * j, dtype="bfloat16",
                                             shape=[batch, 16], strides=[16, 1], storage_bytes=batch * 32)
                           for j in range(2)]
            rng = [schema.RngState(generator="default", seed_address=CAPTURE + 0x80000 + 64 * g,
                                   offset_address=CAPTURE + 0x80008 + 64 * g, increment=4)] if template == 0 else []
            graphs.append(schema.GraphRecord(
                key=key, template=template, nodes=w.add_blob(f"graph/{g}/nodes", nodes.tobytes()),
                payload=w.add_blob(f"graph/{g}/payload", payload),
                attrs=w.add_blob(f"graph/{g}/attrs", attrs.tobytes()),
                num_kernel_nodes=int((nodes["kind"] == k.NODE_KERNEL).sum()), outputs=outputs,
                output_tree=tree if template == 0 else "", is_child=template == 1, rng=rng))
        snapshots = [schema.MemorySnapshot(address=CAPTURE + 0x50000, size=3000,
                                           blob=w.add_blob("snap/0", bytes(3000))),
                     schema.MemorySnapshot(address=CAPTURE + 0x60000, size=64,
                                           blob=w.add_blob("snap/1", bytes(range(64)), compress=False))]
        w.finish(schema.Manifest(
            schema_version=schema.SCHEMA_VERSION, created_utc="2026-11-30T12:00:00+00:00", fingerprint=FINGERPRINT,
            arena=schema.ArenaLayout(base=ARENA_BASE, size=ARENA_SIZE, granularity=2 << 20,
                                     capture_start=CAPTURE_START, capture_end=CAPTURE_END),
            blobs={}, images=images, functions=functions, templates=templates, graphs=graphs, snapshots=snapshots,
            num_events=1, extra={"kv_pages": "64"},
            trace=_trace(),
            ranks=schema.RankTemplate(world_size=2, deltas=[schema.RankDelta(rank=1, patches=[
                schema.BytePatch(offset=56, data=b"\x02", graph=0),  # a kernel's batch argument
                schema.BytePatch(offset=5, data=b"\x07", snapshot=0)])]),
            slots=[schema.SlotSpec(id=7 + batch, op="all_reduce", group="tp", dtype="bfloat16", count=256,
                                   send=CAPTURE + 0x70000, recv=CAPTURE + 0x70000, send_bytes=512, recv_bytes=512,
                                   order=batch) for batch in (1, 2)]))


def _trace() -> schema.AllocationTrace:
    """A short allocation trace as SAVE records it (init allocations, then the capture phase) with live blocks."""
    from foundry_core import layout

    rows = np.zeros(4, layout.TRACE_DTYPE)
    rows["op"], rows["pool"] = layout.OP_ALLOC, [0, 0, 1, 2]
    rows["granules"], rows["offset"] = [1, 4, 1, 2], [0, 2 << 20, CAPTURE_START, CAPTURE_START + (2 << 20)]
    return layout.encode(rows, 2, labels=[("weights", 0, 2)], blocks=np.array([[0, 4096], [2 << 20, 8192]], "<u8"))


def read_archive(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(manifest as plain data, every blob's bytes) of an archive, for building tampered variants."""
    with Archive.open(path) as archive:
        doc = msgspec.to_builtins(archive.manifest, builtin_types=(bytes,))  # bytes stay msgpack bin, not base64
        return doc, {n: archive.blob(n) for n in archive.names()}


@dataclass(frozen=True)
class Stored:
    """A blob given as its stored bytes, recorded with ``codec`` and declared ``size`` (whatever they are)."""

    data: bytes
    codec: str
    size: int


def write_archive(path: Path, doc, blobs: dict[str, "bytes | Stored"]) -> None:
    """Write ``doc`` (a manifest as plain data, which may be anything) with ``blobs``, each with a valid sha256 of
    its stored bytes."""
    with ArchiveWriter(path) as w:
        for name, data in blobs.items():
            if isinstance(data, Stored):
                w.add_blob(name, data.data, compress=False)
            else:
                w.add_blob(name, data)
        w.finish(_EMPTY_MANIFEST)
    with Archive.open(path) as archive:
        records = msgspec.to_builtins(archive.manifest.blobs, builtin_types=(bytes,))
    for name, data in blobs.items():
        if isinstance(data, Stored):
            records[name] = dict(records[name], codec=data.codec, size=data.size)
    if isinstance(doc, dict):
        doc = dict(doc, blobs=records)
    replace_manifest(path, doc)


def replace_manifest(path: Path, doc) -> None:
    """Replace the manifest with ``doc`` (msgpack-able, :class:`Deep` allowed), fixing the header's size and sha256."""
    data = bytearray(path.read_bytes())
    magic, version, flags, offset, _, _ = HEADER.unpack_from(data)
    encoded = encode_manifest(doc)
    del data[offset:]
    data += encoded
    HEADER.pack_into(data, 0, magic, version, flags, offset, len(encoded), hashlib.sha256(encoded).digest())
    path.write_bytes(bytes(data))


_EMPTY_MANIFEST = schema.Manifest(
    schema_version=schema.SCHEMA_VERSION, created_utc="", fingerprint=FINGERPRINT,
    arena=schema.ArenaLayout(base=ARENA_BASE, size=ARENA_SIZE, granularity=2 << 20, capture_start=0, capture_end=0),
    blobs={}, images=[], functions=[], templates=[], graphs=[],
)


def tamper(src: Path, dst: Path, *, doc=None, blobs: dict[str, bytes] | None = None, edit=None) -> Path:
    """Copy archive ``src`` to ``dst`` with its manifest or blobs changed; ``edit(doc, blobs)`` may change both."""
    base_doc, base_blobs = read_archive(src)
    doc = base_doc if doc is None else doc
    base_blobs.update(blobs or {})
    if edit is not None:
        edit(doc, base_blobs)
    write_archive(dst, doc, base_blobs)
    return dst


# -- corruptions --------------------------------------------------------------------------------------------------

_BOUNDARY = [0, 1, 2, 7, 8, 39, 40, 41, 63, 64, 199, 200, 201, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
             2**64 - 1, -1, -(2**63), ARENA_BASE, ARENA_BASE - 1, CAPTURE, CAPTURE - 8, ARENA_BASE + CAPTURE_END,
             ARENA_BASE + CAPTURE_END - 8, ARENA_BASE + ARENA_SIZE, 10**9]


def _odd_value(rng: random.Random):
    roll = rng.random()
    if roll < 0.45:
        value = rng.choice(_BOUNDARY) + rng.choice((0, 0, 0, 1, -1))
        return value if -(2**63) <= value < 2**64 else value // 2  # msgpack holds no wider integers
    if roll < 0.55:
        return _nested(rng.choice((2, 50, 996, 997, 1500, 5000, 20000)), rng)
    return rng.choice([None, True, False, 1.5, float("nan"), "", "x" * rng.randint(1, 300), b"\x00\xff", [], {},
                       [1, 2, 3], {"a": 1}, "bfloat16", "__class__", "load", "..", -7, 3])


class Deep:
    """A value nested ``depth`` levels deep (lists and maps), encoded as raw msgpack by :func:`encode_manifest`
    (msgspec itself refuses to encode such depths, so a generator needs this to reach the decoder's limits)."""

    def __init__(self, depth: int, seed: int = 0):
        self.depth, self.seed = depth, seed

    def msgpack(self) -> bytes:
        rng = random.Random(self.seed)
        return b"".join(b"\x91" if rng.random() < 0.5 else b"\x81\xa1k" for _ in range(self.depth)) + b"\x00"


def encode_manifest(doc) -> bytes:
    """msgpack of ``doc``, with every :class:`Deep` in it expanded."""
    deep: dict[bytes, bytes] = {}

    def mark(value):
        if isinstance(value, Deep):
            token = f"\x00deep{len(deep)}\x00"
            deep[msgspec.msgpack.encode(token)] = value.msgpack()
            return token
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    encoded = msgspec.msgpack.encode(mark(doc))
    for token, raw in deep.items():
        encoded = encoded.replace(token, raw)
    return encoded


def _nested(depth: int, rng: random.Random) -> Deep:
    return Deep(depth, rng.randrange(1 << 30))


def _paths(doc, prefix=()):
    yield prefix, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, prefix + (i,))


def _set(doc, path, value, delete: bool = False) -> None:
    node = doc
    try:
        for step in path[:-1]:
            node = node[step]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


def corrupt_manifest(doc, blobs, rng: random.Random) -> str:
    paths = [p for p, _ in _paths(doc) if p and p[0] != "blobs"]
    path = rng.choice(paths)
    roll = rng.random()
    if roll < 0.7:
        _set(doc, path, _odd_value(rng))
        return f"manifest {'/'.join(map(str, path))} = odd value"
    if roll < 0.8:
        _set(doc, path, None, delete=True)
        return f"manifest {'/'.join(map(str, path))} deleted"
    if roll < 0.9:
        doc[rng.choice(["zzz", "graphs", "extra", "snapshots"])] = _nested(rng.randint(900, 30000), rng)
        return "manifest field nested deep"
    lists = [p for p, v in _paths(doc) if isinstance(v, list) and v and p and p[0] != "blobs"]
    path = rng.choice(lists)
    value = doc
    for step in path:
        value = value[step]
    value.append(value[rng.randrange(len(value))]) if rng.random() < 0.5 else value.pop(rng.randrange(len(value)))
    return f"manifest list {'/'.join(map(str, path))} resized"


_TABLES = {"nodes": schema.NODE_DTYPE, "payload": np.dtype("<u8"), "attrs": schema.ATTR_DTYPE}


def corrupt_table(doc, blobs, rng: random.Random) -> str:
    graph = rng.randrange(len(doc["graphs"]))
    rec = doc["graphs"][graph]
    roll = rng.random()
    if roll < 0.5:  # one field of one node
        nodes = np.frombuffer(blobs[rec["nodes"]], schema.NODE_DTYPE).copy()
        i = rng.randrange(len(nodes))
        field = rng.choice(["payload_off", "kind", "ref", "grid", "block", "smem", "payload_len", "attr_off",
                            "attr_cnt", "kind", "ref", "payload_off", "payload_len"])
        bits = 64 if field == "payload_off" else 32
        value = rng.choice(_BOUNDARY + [len(nodes), len(blobs[rec["payload"]]), 3, 4, 5, 6, 7, 9]) % (1 << bits)
        if nodes[field].ndim > 1:
            nodes[i][field][rng.randrange(3)] = value
        else:
            nodes[i][field] = value
        blobs[rec["nodes"]] = nodes.tobytes()
        return f"graph {graph} node {i} {field} = {value:#x}"
    if roll < 0.75:  # one word of the payload (memset/memcpy records, kernel arguments)
        payload = np.frombuffer(blobs[rec["payload"]], "<u8").copy()
        i = rng.randrange(len(payload))
        payload[i] = rng.choice(_BOUNDARY + [1, 3, 4, 1 << 40]) % (1 << 64)
        blobs[rec["payload"]] = payload.tobytes()
        return f"graph {graph} payload word {i} = {int(payload[i]):#x}"
    if roll < 0.85:  # an edge
        tpl = doc["templates"][rec["template"]] if isinstance(rec.get("template"), int) and \
            0 <= rec["template"] < len(doc["templates"]) else doc["templates"][0]
        edges = np.frombuffer(blobs[tpl["edges"]], schema.EDGE_DTYPE).copy()
        i = rng.randrange(len(edges))
        field = rng.choice(["src", "dst", "from_port", "to_port", "type"])
        value = rng.choice([0, 1, 2, 3, 7, 8, 9, 255, 2**32 - 1, len(edges)])
        edges[i][field] = value % (1 << (edges[field].itemsize * 8))
        blobs[tpl["edges"]] = edges.tobytes()
        return f"template edge {i} {field} changed"
    if roll < 0.92:  # an attribute id
        attrs = np.frombuffer(blobs[rec["attrs"]], schema.ATTR_DTYPE).copy()
        attrs[rng.randrange(len(attrs))]["id"] = rng.choice([0, 1, 3, 7, 12, 99, 2**32 - 1])
        blobs[rec["attrs"]] = attrs.tobytes()
        return f"graph {graph} attribute id changed"
    name = rng.choice([rec["nodes"], rec["payload"], rec["attrs"]])
    data = bytearray(blobs[name])
    if rng.random() < 0.5:
        cut = rng.randint(0, len(data))
        blobs[name] = bytes(data[:cut]) + rng.randbytes(rng.choice((0, 0, 8, 64)))
        return f"blob {name} resized to {len(blobs[name])}"
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    blobs[name] = bytes(data)
    return f"blob {name} bytes flipped"


_ZEROS: dict[int, bytes] = {}


def zlib_of_zeros(n: int) -> bytes:
    """A zlib stream of ``n`` zero bytes (about 1000:1), made once per process."""
    if n not in _ZEROS:
        packer, chunk = zlib.compressobj(9), bytes(1 << 20)
        parts = [packer.compress(chunk[: min(len(chunk), n - at)]) for at in range(0, n, len(chunk))]
        _ZEROS[n] = b"".join(parts) + packer.flush()
    return _ZEROS[n]


def _used_blob_names(doc) -> list[str]:
    """Names the manifest uses for graph tables, template edges, snapshots and images (with repeats)."""
    names = [g.get(f) for g in doc.get("graphs", []) if isinstance(g, dict) for f in ("nodes", "payload", "attrs")]
    names += [t.get("edges") for t in doc.get("templates", []) if isinstance(t, dict)]
    names += [x.get("blob") for key in ("snapshots", "images") for x in doc.get(key, []) if isinstance(x, dict)]
    return [n for n in names if isinstance(n, str) and n]


def corrupt_sizes(doc, blobs, rng: random.Random) -> str:
    """Declared sizes against stored ones: what a zlib bomb or a lying record looks like."""
    used = _used_blob_names(doc)
    roll = rng.random()
    if roll < 0.35:  # one blob's declared size
        name = rng.choice(used)
        data = blobs[name] if isinstance(blobs[name], bytes) else blobs[name].data
        packed = rng.random() < 0.7
        stored = zlib.compress(data, 6) if packed else data
        size = rng.choice([0, 1, len(data) - 1, len(data) + 1, 2 * len(data), len(stored) * 1100 + 64,
                           len(stored) * 1100 + 65, BUDGET - 1, BUDGET, BUDGET + 1, 2**31, 2**63 - 1, -1])
        blobs[name] = Stored(stored, "zlib" if packed else "raw", size)
        return f"blob {name} ({'zlib' if packed else 'raw'}, {len(data)} bytes) declared {size}"
    if roll < 0.55:  # a zlib stream that inflates to other than it declares
        name = rng.choice(used)
        data = blobs[name] if isinstance(blobs[name], bytes) else bytes(64)
        stream = zlib.compress(data, 6)
        how = rng.choice(["truncated", "trailing bytes", "two streams", "more than declared", "less than declared"])
        stored, size = {"truncated": (stream[: max(len(stream) - rng.randint(1, 8), 0)], len(data)),
                        "trailing bytes": (stream + rng.randbytes(rng.randint(1, 16)), len(data)),
                        "two streams": (stream + stream, 2 * len(data)),
                        "more than declared": (zlib.compress(data + bytes(4096), 6), len(data)),
                        "less than declared": (stream, len(data) + rng.choice((1, 8, 4096)))}[how]
        blobs[name] = Stored(stored, "zlib", size)
        return f"blob {name} zlib {how}"
    if roll < 0.85:  # zlib bombs, each within the budget, in one to four blobs
        names = rng.sample(sorted(set(used)), rng.randint(1, min(4, len(set(used)))))
        sizes = [rng.choice((BUDGET // 4, BUDGET // 2, BUDGET - 1, BUDGET, BUDGET + 1)) for _ in names]
        for name, size in zip(names, sizes):
            blobs[name] = Stored(zlib_of_zeros(size), "zlib", size)
        return f"zlib bombs {dict(zip(names, sizes))}"
    # one blob (a bomb or a large raw one) named by many records
    target = rng.choice(used)
    size = rng.choice((BUDGET // 8, BUDGET // 2))
    blobs[target] = Stored(zlib_of_zeros(size), "zlib", size) if rng.random() < 0.7 else rng.randbytes(size // 4)
    fields = [(g, f) for g in doc.get("graphs", []) if isinstance(g, dict) for f in ("nodes", "payload", "attrs")]
    fields += [(x, "blob") for key in ("snapshots", "images") for x in doc.get(key, []) if isinstance(x, dict)]
    for record, field in rng.sample(fields, rng.randint(2, len(fields))):
        record[field] = target
    return f"blob {target} named by many records"


def make_case(valid: tuple[dict, dict[str, bytes]], seed: int, out: Path) -> list[str]:
    """Write corrupted case ``seed`` to ``out``; returns what was done to it."""
    rng = random.Random(seed)
    doc = msgspec.msgpack.decode(msgspec.msgpack.encode(valid[0]))
    blobs = dict(valid[1])
    done = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        roll = rng.random()
        corrupt = corrupt_manifest if roll < 0.35 else corrupt_sizes if roll < 0.5 else corrupt_table
        try:
            done.append(corrupt(doc, blobs, rng))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            done.append("(a corruption did not apply to the changed shape)")
    write_archive(out, doc, blobs)
    return done


# -- checking one case ---------------------------------------------------------------------------------------------


def check_case(path: Path, lib) -> str:
    """Run the CPU side of LOAD and the native bounds check; 'accepted' or 'refused: ...'. Other exceptions escape."""
    from foundry_core import restore

    native_refusals = 0
    outcome = "accepted"
    try:
        with Archive.open(path, OPTIONS) as archive:
            try:
                restore.check_archive_offline(archive)  # every rank, the trace, the budget
            except FoundryError as err:
                outcome = f"refused: {err}"
            native_refusals = _native_checks(archive, lib)
    except FoundryError as err:
        outcome = f"refused: {err}"
    if "\n" in outcome:
        raise AssertionError(f"multi-line error: {outcome!r}")
    return outcome + (f" [native refused {native_refusals}]" if native_refusals else "")


def _native_checks(archive, lib) -> int:
    """The C builder's own check on every graph's raw tables, whether Python accepted them or not (what LOAD would
    hold is within the budget, or nothing is read)."""
    from foundry_core import restore

    m = archive.manifest
    refused = 0
    try:
        archive.check_inflate_budget()
    except FoundryError:
        return 0
    for rec in m.graphs:
        try:
            nodes = archive.blob_array(rec.nodes, schema.NODE_DTYPE)
            payload = archive.blob_array(rec.payload, np.uint8) if rec.payload else np.zeros(0, np.uint8)
            attrs = archive.blob_array(rec.attrs, schema.ATTR_DTYPE) if rec.attrs else np.zeros(0, schema.ATTR_DTYPE)
            tpl = m.templates[rec.template]
            edges = archive.blob_array(tpl.edges, schema.EDGE_DTYPE) if tpl.edges else np.zeros(0, schema.EDGE_DTYPE)
        except FoundryError:
            continue  # tables that do not even decode as records never reach native code
        tables = restore.NativeTables(nodes, payload, attrs, edges, np.zeros(len(m.functions), np.uint64),
                                      np.zeros(min(m.num_events, 1 << 16), np.uint64),
                                      np.zeros(len(m.graphs), np.uint64))
        refused += restore.native_check(lib, tables) is not None
    return refused


# -- the run -------------------------------------------------------------------------------------------------------


def _worker(conn, valid_path: str, workdir: str) -> None:
    """Child process: receive case numbers, answer (case, outcome kind, detail)."""
    from foundry_core.native import native_lib

    lib = native_lib()
    selftest = os.environ.get("FOUNDRY_FUZZ_SELFTEST") == "1"
    valid = read_archive(Path(valid_path))
    case_path = Path(workdir) / f"case-{os.getpid()}.foundry"
    conn.send("ready")
    while True:
        seed = conn.recv()
        if seed is None:
            return
        try:
            done = make_case(valid, seed, case_path)
        except Exception as err:  # the generator, not the code under test
            conn.send((seed, "skipped", f"generator: {err!r}", [], 0))
            continue
        try:
            base = _start_peak()
            if selftest:  # prove the harness sees each kind of defect (test_archive_fuzz_load.py)
                _misbehave(seed)
            outcome = check_case(case_path, lib)
            kind = "accepted" if outcome.startswith("accepted") else "refused"
            conn.send((seed, kind, outcome, done, _status_kib("VmHWM") * 1024 - base))
        except BaseException as err:
            conn.send((seed, "exception", "".join(traceback.format_exception_only(type(err), err)).strip() + "\n"
                       + traceback.format_exc(), done, 0))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _start_peak() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _misbehave(seed: int) -> None:
    if seed % 5 == 0:
        import faulthandler

        faulthandler.disable()  # a deliberate crash needs no stack dump in the test log
        os.abort()
    if seed % 5 == 1:
        time.sleep(3600)
    if seed % 5 == 2:
        raise ValueError("a non-Foundry exception")
    if seed % 5 == 3:
        _misbehave.held = bytearray(MEMORY_LIMIT + (16 << 20))  # touched: calloc'd pages count once written
        _misbehave.held[::4096] = b"x" * len(_misbehave.held[::4096])


def run(cases: int, seed0: int, timeout: float, jobs: int, verbose: bool, progress: bool = True) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # workers start from this process's imports: a crashed one is replaced at once
    workdir = Path(tempfile.mkdtemp(prefix="foundry-fuzz-"))
    valid_path = workdir / "valid.foundry"
    write_realistic_archive(valid_path)
    from foundry_core import restore

    with Archive.open(valid_path) as archive:  # the starting point must pass, or every refusal means nothing
        restore.check_archive_for_load(archive)
    counts: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    defects: list[str] = []
    worst = 0  # the most memory one case took
    pending = list(range(seed0, seed0 + cases))[::-1]
    workers = []

    def spawn():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, str(valid_path), str(workdir)), daemon=True)
        proc.start()
        if not parent.poll(300) or parent.recv() != "ready":
            raise RuntimeError("a fuzz worker did not start")
        return {"proc": proc, "conn": parent, "seed": None, "since": 0.0}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cases, unit="case", desc="fuzz", leave=False)
    t0 = time.perf_counter()
    try:
        workers = [spawn() for _ in range(jobs)]
        while pending or any(w["seed"] is not None for w in workers):
            for i, w in enumerate(workers):
                if w["seed"] is None and pending:
                    w["seed"], w["since"] = pending.pop(), time.monotonic()
                    w["conn"].send(w["seed"])
                if w["seed"] is None:
                    continue
                answer = None
                if w["conn"].poll(0.01):
                    try:
                        answer = w["conn"].recv()
                    except (EOFError, OSError):
                        w["proc"].join(5)  # the process died: reported below
                if answer is not None:
                    seed, kind, detail, done, peak = answer
                    counts[kind] += 1
                    worst = max(worst, peak)
                    if peak > MEMORY_LIMIT:
                        counts["memory"] += 1
                        defects.append(f"case {seed} took {peak >> 20} MiB (limit {MEMORY_LIMIT >> 20}): {done}")
                    if "[native refused" in detail:  # the C check's own verdict on the raw tables
                        counts["native refused"] += 1
                        counts["native refused, Python accepted"] += kind == "accepted"
                    if kind == "refused":
                        reasons[_reason(detail)] += 1
                    if kind in ("exception", "skipped"):
                        defects.append(f"case {seed} {kind}: {detail}  <- {done}")
                    if verbose:
                        print(f"case {seed}: {kind}: {detail}  <- {done}")
                    w["seed"] = None
                    if bar:
                        bar.update(1)
                elif not w["proc"].is_alive() or time.monotonic() - w["since"] > timeout:
                    kind = "crash" if not w["proc"].is_alive() else "hang"
                    counts[kind] += 1
                    defects.append(f"case {w['seed']} {kind} (exit code {w['proc'].exitcode})")
                    w["proc"].kill()
                    w["proc"].join()
                    workers[i] = spawn()
                    if bar:
                        bar.update(1)
    finally:
        for w in workers:
            try:
                w["conn"].send(None)
            except (OSError, BrokenPipeError):
                pass
            w["proc"].join(5)
            if w["proc"].is_alive():
                w["proc"].kill()
        if bar:
            bar.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"cases": cases, "seconds": time.perf_counter() - t0, "counts": counts, "reasons": reasons,
            "defects": defects, "peak_mib": worst >> 20}


def _reason(detail: str) -> str:
    """A short class of a refusal message, for the summary (paths and numbers dropped)."""
    text = detail.removeprefix("refused: ").split(" [native")[0]
    text = text.split(": ", 1)[1] if text.startswith("/") else text
    words = [w for w in text.replace("'", " ").split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:7])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="number of corrupted archives to check (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="first case number; case N is always the same corruption")
    ap.add_argument("--case", type=int, help="run only this case number (with -v: show what it did)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one case may take before it counts as a hang")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="checking processes (default 2)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's outcome and corruption")
    a = ap.parse_args(argv)
    if a.case is not None:
        a.seed, a.cases = a.case, 1
    result = run(a.cases, a.seed, a.timeout, a.jobs, a.verbose, progress=sys.stderr.isatty())
    c = result["counts"]
    print(f"fuzz_archives: {result['cases']} corrupted archives (cases {a.seed}..{a.seed + a.cases - 1}) "
          f"in {result['seconds']:.0f} s")
    print(f"  accepted {c['accepted']}, refused with a FoundryError {c['refused']}")
    print(f"  crashes {c['crash']}, hangs {c['hang']}, non-Foundry exceptions {c['exception']}, "
          f"generator failures {c['skipped']}")
    print(f"  memory over {MEMORY_LIMIT >> 20} MiB {c['memory']} (decompression budget {BUDGET >> 20} MiB; the most "
          f"one case took: {result['peak_mib']} MiB)")
    print(f"  native bounds check (raw tables, also where Python refused): refused in {c['native refused']} "
          f"archives, {c['native refused, Python accepted']} of them accepted by Python")
    print("  most common refusals:")
    for reason, n in result["reasons"].most_common(12):
        print(f"    {n:6d}  {reason}")
    for line in result["defects"][:20]:
        print("DEFECT", line)
    return 1 if result["defects"] else 0


if __name__ == "__main__":
    sys.exit(main())
