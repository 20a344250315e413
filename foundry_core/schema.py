"""The archive schema: one set of msgspec Structs drives both SAVE and LOAD.

An archive is one file: a fixed header, the blobs, then this manifest (msgpack).
Large arrays (node tables, argument bytes, edges, kernel images, memory
snapshots) live in blobs; the manifest names them and says how to read them.

Binary record layouts shared with the native restore loop (``_native/restore.c``)
are defined once here as numpy dtypes; the C side mirrors them in ``restore.h``.
"""
from __future__ import annotations

from typing import Optional

import msgspec
import numpy as np

from foundry_core.errors import ArchiveError

SCHEMA_VERSION = 4  # 2: allocation trace, RNG state per graph; 3: edge data read natively (2 may hold wrong
#   edge data, cuda-python#1804), module_variables; 4: rank variants (a reader of 3 would patch a variant rank's
#   delta onto rank 0's graphs)

# ---------------------------------------------------------------------------
# Binary records (little-endian, packed) used inside graph blobs.
# ---------------------------------------------------------------------------

# Node kinds. The numbers are ours (not CUgraphNodeType) so the archive does not
# depend on driver enum values.
NODE_KERNEL = 0
NODE_MEMSET = 1
NODE_MEMCPY = 2
NODE_EMPTY = 3
NODE_EVENT_RECORD = 4
NODE_EVENT_WAIT = 5
NODE_CHILD_GRAPH = 6
NODE_SLOT = 7
NODE_KIND_NAMES = {
    NODE_KERNEL: "kernel",
    NODE_MEMSET: "memset",
    NODE_MEMCPY: "memcpy",
    NODE_EMPTY: "empty",
    NODE_EVENT_RECORD: "event_record",
    NODE_EVENT_WAIT: "event_wait",
    NODE_CHILD_GRAPH: "child_graph",
    NODE_SLOT: "slot",
}

#: One row per node, in topological order.
#: kernel:  ref = function index, grid/block/smem as launched, payload = packed argument buffer
#: memset:  payload = MEMSET_DTYPE record
#: memcpy:  payload = raw CUDA_MEMCPY3D bytes (device-to-device only)
#: event_*: ref = event index (events are created fresh at LOAD)
#: child:   ref = index of a graph in Manifest.graphs (a child graph record)
#: slot:    ref = SlotSpec.id; a placeholder the caller fills at LOAD (e.g. a collective captured on the live
#:          communicator). LOAD refuses to instantiate a graph with an unfilled slot.
NODE_DTYPE = np.dtype(
    [
        ("payload_off", "<u8"),
        ("kind", "<u4"),
        ("ref", "<u4"),
        ("grid", "<u4", (3,)),
        ("block", "<u4", (3,)),
        ("smem", "<u4"),
        ("payload_len", "<u4"),
        ("attr_off", "<u4"),
        ("attr_cnt", "<u4"),
        ("_pad", "<u4", (2,)),
    ]
)
assert NODE_DTYPE.itemsize == 64

#: Launch attributes of kernel nodes: (id, value) with the raw 64-byte CUlaunchAttributeValue.
ATTR_DTYPE = np.dtype([("id", "<u4"), ("_pad", "<u4"), ("value", "u1", (64,))])
assert ATTR_DTYPE.itemsize == 72

#: Edges with their edge data (CUgraphEdgeData: from_port, to_port, type).
EDGE_DTYPE = np.dtype(
    [("src", "<u4"), ("dst", "<u4"), ("from_port", "u1"), ("to_port", "u1"), ("type", "u1"), ("_pad", "u1", (5,))]
)
assert EDGE_DTYPE.itemsize == 16

#: Memset node payload (mirrors CUDA_MEMSET_NODE_PARAMS without the context).
MEMSET_DTYPE = np.dtype(
    [("dst", "<u8"), ("pitch", "<u8"), ("value", "<u4"), ("element_size", "<u4"), ("width", "<u8"), ("height", "<u8")]
)
assert MEMSET_DTYPE.itemsize == 40

#: Bytes of one allocation-trace row (``layout.TRACE_DTYPE``).
TRACE_RECORD_BYTES = 16


# ---------------------------------------------------------------------------
# Manifest structs
# ---------------------------------------------------------------------------


class Fingerprint(msgspec.Struct, frozen=True, kw_only=True):
    """What must match between the SAVE and the LOAD machine/software."""

    gpu_name: str
    compute_capability: str  # "9.0"
    driver_version: int  # cuDriverGetVersion, e.g. 13000
    cuda_runtime: str  # torch.version.cuda
    torch: str
    triton: str  # "" when absent
    foundry: str
    key: str  # caller-supplied key (model/config/layout), free-form; compared verbatim


class Blob(msgspec.Struct, frozen=True, kw_only=True):
    """A byte range of the archive file. ``codec`` is "raw" or "zlib"."""

    offset: int
    stored_size: int
    size: int
    codec: str
    sha256: str  # of the stored bytes


class ArenaLayout(msgspec.Struct, frozen=True, kw_only=True):
    """The deterministic arena as SAVE left it."""

    base: int
    size: int  # reserved virtual size
    granularity: int
    capture_start: int  # arena offset where the capture phase began
    capture_end: int  # arena offset where it ended (LOAD maps [start, end) itself)


class MemorySnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Contents of a live buffer created during the capture phase that graphs read."""

    address: int
    size: int
    blob: str
    note: str = ""


class ModuleVariable(msgspec.Struct, frozen=True, kw_only=True):
    """A module-scope variable graphs depend on (SAVE with ``FOUNDRY_MODULE_GLOBALS=relocate``, see
    ``foundry_core.modglobals``): LOAD looks ``name`` up in its fresh load of image ``image``, writes SAVE's live
    bytes into it (``value``; "" keeps the image's) and patches the argument words that pointed into it."""

    image: int  # index into Manifest.images (a kernel-less image is archived for this)
    name: str
    size: int
    value: str = ""
    #: (graph index, byte offset of the 8-byte word in that graph's payload, offset inside the variable)
    refs: list[tuple[int, int, int]] = []


class KernelImage(msgspec.Struct, frozen=True, kw_only=True):
    """A module image (cubin/fatbin) loaded by the workload, stored once by hash: embedded as ``blob``, or, with
    ``in_store``, in the host's image store beside the archive under its sha256 (``blob`` is then "")."""

    sha256: str
    blob: str
    size: int
    kernels: list[str]  # entry points in the image (from its ELF symbol table)
    in_store: bool = False


class KernelFunction(msgspec.Struct, frozen=True, kw_only=True):
    """A kernel used by at least one node; resolved at LOAD with cuModuleGetFunction."""

    image: int  # index into Manifest.images
    name: str
    #: CUfunction_attribute -> value, for settable attributes the workload changed
    #: (max dynamic shared memory, carve-out, cluster attributes, ...).
    attributes: dict[int, int] = {}


class TensorSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A tensor that LOAD recreates over memory it already restored."""

    address: int  # data_ptr()
    dtype: str  # torch dtype name without the "torch." prefix
    shape: list[int]
    strides: list[int]  # in elements
    storage_bytes: int  # bytes from data_ptr() the view may touch


class TraceLabel(msgspec.Struct, frozen=True, kw_only=True):
    """A name the application gave to trace records [first, end) with ``Session.label()``."""

    name: str
    first: int
    end: int


class AllocationTrace(msgspec.Struct, frozen=True, kw_only=True):
    """The arena's segment allocations and frees, in order, from ``Session.open()`` to ``save()``.

    ``records`` is zlib-compressed ``layout.TRACE_DTYPE`` rows (op, pool, size in granules, offset). LOAD must
    have made exactly the first ``compared`` rows (those before the capture phase) when ``restore()`` is called.
    """

    records: bytes
    count: int
    compared: int
    sha256: str  # of the first ``compared`` raw rows
    labels: list[TraceLabel] = []
    #: Row index -> what the segment held at SAVE (live tensors' sizes), for messages.
    held: dict[int, str] = {}
    #: The live PyTorch blocks of that point which the graphs' arguments point into: zlib of (arena offset, size)
    #: <u8 pairs, sorted. Catches tensors that moved inside shared segments (invisible to the segment rows).
    blocks: bytes = b""
    num_blocks: int = 0
    blocks_sha256: str = ""

    @property
    def inflated_bytes(self) -> int:
        """What ``records`` and ``blocks`` declare to decompress to."""
        return TRACE_RECORD_BYTES * max(self.count, 0) + 16 * max(self.num_blocks, 0)


class RngState(msgspec.Struct, frozen=True, kw_only=True):
    """PyTorch's graph-safe Philox state that a graph reads: before each replay LOAD writes the generator's seed and
    offset there and advances the generator by ``increment``, exactly as ``CUDAGraph.replay()`` does."""

    generator: str  # "default": torch.cuda.default_generators[device]
    seed_address: int  # int64 holding the seed
    offset_address: int  # int64 holding the generator offset at replay
    increment: int  # offset advance per replay (sum of the graph's Philox increments)


class GraphTemplate(msgspec.Struct, frozen=True, kw_only=True):
    """Topology shared by graphs of many batch sizes: node kinds and edges (stored once)."""

    num_nodes: int
    kinds_sha256: str  # identity of the (node kinds, edges) topology
    edges: str  # blob of EDGE_DTYPE records
    num_edges: int


class GraphRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One captured graph, rebuilt node for node at LOAD."""

    key: str
    template: int  # index into Manifest.templates
    nodes: str  # blob of NODE_DTYPE records
    payload: str  # blob of argument buffers / memset / memcpy payloads
    attrs: str  # blob of ATTR_DTYPE records
    num_kernel_nodes: int
    outputs: list[TensorSpec] = []
    output_tree: str = ""  # torch.utils._pytree treespec as JSON; "" for a single tensor / no outputs
    #: Output leaves that are not tensors (None for an optional field, or a bool/int/float/str), by leaf position.
    output_constants: dict[int, bool | int | float | str | None] = {}
    is_child: bool = False  # True: only used as a child-graph node of another graph
    capture_seconds: float = 0.0
    rng: list[RngState] = []


class SlotSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a placeholder node stands for; the caller that recorded it (e.g. comm_patch) fills it at LOAD.

    Engine-agnostic fields for communication: ``op`` (all_reduce, all_gather, ...), ``group`` (a name the
    filler maps to a communicator), ``dtype`` (torch dtype name), ``count`` (elements per rank),
    ``send``/``recv`` (device addresses, inside the arena), ``order`` (position in the capture sequence).
    """

    id: int
    op: str
    group: str = ""
    dtype: str = ""
    count: int = 0
    send: int = 0
    recv: int = 0
    send_bytes: int = 0  # extent read from ``send`` (checked against the arena at LOAD)
    recv_bytes: int = 0  # extent written at ``recv``
    order: int = 0
    extra: dict[str, str] = {}


class BytePatch(msgspec.Struct, frozen=True, kw_only=True):
    """Bytes that differ on one rank: in graph ``graph``'s payload (``snapshot`` < 0) or in a snapshot."""

    offset: int
    data: bytes
    graph: int = -1
    snapshot: int = -1


class RankDelta(msgspec.Struct, frozen=True, kw_only=True):
    """How rank ``rank`` differs from the graphs of rank ``base`` (0, or a rank stored as a variant), after masking
    capture noise."""

    rank: int
    patches: list[BytePatch] = []
    base: int = 0


class RankVariant(msgspec.Struct, frozen=True, kw_only=True):
    """A rank whose graphs differ from rank 0's in structure (other kernel code, launch shapes, table sizes): its
    whole manifest. Its blob names are the template file's (records shared where the bytes are equal); its
    ``blobs``, ``fingerprint`` and ``ranks`` are not used (the template's are)."""

    rank: int
    manifest: "Manifest"


class RankTemplate(msgspec.Struct, frozen=True, kw_only=True):
    """One archive serving every rank of a layout: the graphs are rank 0's, a variant's (``variants``) or one of
    those patched by a delta (``deltas``); every rank 1..world_size-1 has one delta or one variant."""

    world_size: int
    deltas: list[RankDelta] = []
    noise_bytes: int = 0  # argument/snapshot bytes that differed between two captures of the same rank
    layout: dict[str, str] = {}
    variants: list[RankVariant] = []


class Manifest(msgspec.Struct, kw_only=True):
    schema_version: int
    created_utc: str
    fingerprint: Fingerprint
    arena: ArenaLayout
    blobs: dict[str, Blob]
    images: list[KernelImage]
    functions: list[KernelFunction]
    templates: list[GraphTemplate]
    graphs: list[GraphRecord]
    snapshots: list[MemorySnapshot] = []
    num_events: int = 0
    trace: Optional[AllocationTrace] = None  # None only in archives written without a session (tests, tools)
    #: Free-form, caller-supplied (e.g. the SGLang plugin's KV-pool configuration).
    extra: dict[str, str] = {}
    #: Placeholder nodes (NODE_SLOT) by id; filled at LOAD by the caller.
    slots: list[SlotSpec] = []
    #: Set when one archive serves several ranks (comm_patch templates); None for a single-rank archive.
    ranks: RankTemplate | None = None
    #: Module variables LOAD relocates and fills (only with FOUNDRY_MODULE_GLOBALS=relocate at SAVE).
    module_variables: list[ModuleVariable] = []


def rank_manifests(m: Manifest) -> list[Manifest]:
    """The manifest and those of its rank variants: everything an archive's blobs and images are named from."""
    return [m] + ([v.manifest for v in m.ranks.variants] if m.ranks is not None else [])


def rank_images(m: Manifest) -> list[KernelImage]:
    """The kernel-image records of the manifest and of its rank variants (a variant's own images included)."""
    return [im for v in rank_manifests(m) for im in v.images]


def for_rank(m: Manifest, rank: Optional[int]) -> Manifest:
    """What LOAD of ``rank`` reads: for a rank template, the manifest of the graphs this rank is built from (rank
    0's or a variant's, with the template's fingerprint and blob index) and, in its ``ranks``, only this rank's
    delta, now relative to those graphs. Anything else (rank 0, None, a plain archive, a rank's view already) is
    ``m`` itself. A rank the template does not serve is an ArchiveError."""
    t = m.ranks
    if t is None or not rank:
        return m
    if not t.variants and [(d.rank, d.base) for d in t.deltas] == [(rank, 0)]:
        return m  # this rank's view (or a template of rank 0 and this rank alone): nothing to narrow
    variants = {v.rank: v.manifest for v in t.variants}
    delta = next((d for d in t.deltas if d.rank == rank), None)
    if rank in variants and delta is None:
        base, patches = variants[rank], []
    elif delta is not None and rank not in variants and (delta.base == 0 or delta.base in variants):
        base, patches = (variants[delta.base] if delta.base else m), delta.patches
    else:
        raise ArchiveError(f"the archive's rank template has no delta or variant for rank {rank}")
    own = RankTemplate(world_size=t.world_size, noise_bytes=t.noise_bytes, layout=t.layout,
                       deltas=[RankDelta(rank=rank, patches=patches)])
    return msgspec.structs.replace(base, schema_version=m.schema_version, created_utc=m.created_utc,
                                   fingerprint=m.fingerprint, blobs=m.blobs, ranks=own)
