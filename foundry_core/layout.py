"""Layout verification: LOAD proves that its arena holds what SAVE's graphs will read before rebuilding anything.

Addresses in the arena are a pure function of the sequence of segment requests, so two processes agree on every
address exactly when their allocation traces agree. SAVE stores the trace (``schema.AllocationTrace``); at
``restore()`` LOAD compares its own trace up to that point with SAVE's trace up to the capture phase, record for
record, and refuses on the first difference, naming it. The same module checks every address the manifest asks
LOAD to write to or to wrap as a tensor (outputs, snapshots, RNG state) before anything touches the device.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Optional

import numpy as np

from foundry_core import schema
from foundry_core.decompress import inflate, inflate_budget
from foundry_core.errors import ArchiveError, LayoutMismatch

__all__ = ["TRACE_DTYPE", "encode", "decode", "decode_blocks", "check", "check_blocks", "check_addresses",
           "live_blocks", "read_blocks", "first_divergence"]

#: One trace row; mirrors TraceEvent in _native/arena.c.
TRACE_DTYPE = np.dtype(
    [("op", "u1"), ("pool", "u1"), ("reserved", "<u2"), ("granules", "<u4"), ("offset", "<u8")]
)
assert TRACE_DTYPE.itemsize == schema.TRACE_RECORD_BYTES

OP_ALLOC, OP_FREE, OP_MAP = 1, 2, 3
OP_NAMES = {OP_ALLOC: "allocation", OP_FREE: "free", OP_MAP: "raw mapping", 0: "lost record"}
POOL_NAMES = {0: "init", 1: "warm-up", 2: "graph", 3: "restored capture-region", 255: "unnamed"}

ADVICE = ("check that LOAD runs the same model, flags, library versions and plugins as SAVE, and that nothing "
          "(another thread included) allocates in another order before restore(); delete the archive to save again")


# -- encoding ------------------------------------------------------------------------------------------------
def encode(rows: np.ndarray, compared: int, labels: list[tuple[str, int, int]] = (),
           held: Optional[dict[int, str]] = None, blocks: Optional[np.ndarray] = None) -> schema.AllocationTrace:
    """The archive form of a trace whose first ``compared`` rows LOAD must reproduce, with the live blocks
    (``blocks``: (offset, size) rows) LOAD must hold at that point."""
    rows = np.ascontiguousarray(rows, dtype=TRACE_DTYPE)
    if not 0 <= compared <= len(rows):
        raise ValueError(f"compared={compared} outside a trace of {len(rows)} rows")
    raw = rows.tobytes()
    blk = np.ascontiguousarray(np.zeros((0, 2), "<u8") if blocks is None else blocks, dtype="<u8").tobytes()
    return schema.AllocationTrace(
        records=zlib.compress(raw, 6), count=len(rows), compared=compared,
        sha256=hashlib.sha256(raw[: compared * TRACE_DTYPE.itemsize]).hexdigest(),
        labels=[schema.TraceLabel(name=n, first=a, end=b) for n, a, b in labels], held=dict(held or {}),
        blocks=zlib.compress(blk, 6), num_blocks=len(blk) // 16, blocks_sha256=hashlib.sha256(blk).hexdigest(),
    )


def decode(trace: schema.AllocationTrace, where: str = "archive", budget: Optional[int] = None) -> np.ndarray:
    """The trace's rows, checked (length and hash); raises ArchiveError if they are damaged. ``budget``: the
    archive's decompression budget (``Archive.inflate_budget``; None: from the available memory)."""
    n = TRACE_DTYPE.itemsize
    raw = inflate(trace.records, trace.count * n, f"{where}: allocation trace",  # no more than it declares
                  inflate_budget(budget))
    if len(raw) != trace.count * n or not 0 <= trace.compared <= trace.count:
        raise ArchiveError(f"{where}: allocation trace holds {len(raw)} bytes for {trace.count} records (corrupt)")
    if hashlib.sha256(raw[: trace.compared * n]).hexdigest() != trace.sha256:
        raise ArchiveError(f"{where}: allocation trace does not match its sha256 (corrupt)")
    return np.frombuffer(raw, TRACE_DTYPE)


def decode_blocks(trace: schema.AllocationTrace, where: str = "archive", budget: Optional[int] = None) -> np.ndarray:
    """The (offset, size) rows of the blocks SAVE's graphs read (live before its capture phase); checked.
    ``budget``: as for :func:`decode`."""
    raw = inflate(trace.blocks, 16 * trace.num_blocks, f"{where}: block table of the allocation trace",
                  inflate_budget(budget)) if trace.blocks else b""
    if len(raw) != 16 * trace.num_blocks or hashlib.sha256(raw).hexdigest() != trace.blocks_sha256:
        raise ArchiveError(f"{where}: block table of the allocation trace does not match its size/sha256 (corrupt)")
    return np.frombuffer(raw, "<u8").reshape(-1, 2)


# -- comparison -------------------------------------------------------------------------------------------------
def first_divergence(saved: np.ndarray, live: np.ndarray) -> Optional[int]:
    """Index of the first row where the two traces differ (a missing row counts); None if they are equal."""
    n = min(len(saved), len(live))
    a, b = saved[:n].view(np.uint8).reshape(n, -1), live[:n].view(np.uint8).reshape(n, -1)
    if a.tobytes() != b.tobytes():
        return int(np.nonzero((a != b).any(axis=1))[0][0])
    return None if len(saved) == len(live) else n


def describe_row(row, granularity: int, index: int, trace: Optional[schema.AllocationTrace] = None) -> str:
    """'a 2.0 MiB init-pool allocation at arena+0x400000 ("weights"; held 1 tensor of 2.0 MiB)'."""
    op = OP_NAMES.get(int(row["op"]), f"op {int(row['op'])}")
    pool = POOL_NAMES.get(int(row["pool"]), f"pool {int(row['pool'])}")
    text = f"a {human_bytes(int(row['granules']) * granularity)} {pool}-pool {op} at arena+{int(row['offset']):#x}"
    notes = []
    if trace is not None:
        notes += [f'"{lb.name}"' for lb in trace.labels if lb.first <= index < lb.end]
        if index in trace.held:
            notes.append(f"held {trace.held[index]}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def check(trace: Optional[schema.AllocationTrace], saved: Optional[np.ndarray], live: np.ndarray,
          granularity: int) -> None:
    """Refuse (LayoutMismatch) unless ``live`` — this process's trace up to restore() — equals SAVE's first
    ``trace.compared`` rows. ``saved`` is ``decode(trace)`` (decoded ahead of time, off the critical path)."""
    if trace is None or saved is None:
        raise LayoutMismatch("the archive has no allocation trace, so its arena layout cannot be verified; "
                             "save it again with this foundry")
    expected = saved[: trace.compared]
    i = first_divergence(expected, live)
    if i is None:
        return
    if i >= len(expected):
        raise LayoutMismatch(
            f"arena layout differs from SAVE: this process made {len(live)} allocations/frees before restore(), "
            f"SAVE made {len(expected)}; the first extra one is #{i}, {describe_row(live[i], granularity, i)}; "
            f"the graphs would read the wrong memory — {ADVICE}")
    if i >= len(live):
        raise LayoutMismatch(
            f"arena layout differs from SAVE: this process made only {len(live)} of SAVE's {len(expected)} "
            f"allocations/frees before restore(); missing #{i}, SAVE's "
            f"{describe_row(expected[i], granularity, i, trace)}"
            " — call restore() only after everything the graphs read exists (weights, KV cache, buffers); "
            f"otherwise {ADVICE}")
    raise LayoutMismatch(
        f"arena layout differs from SAVE at allocation #{i} of {len(expected)}: SAVE made "
        f"{describe_row(expected[i], granularity, i, trace)}, this process made {describe_row(live[i], granularity, i)}"
        f"; the graphs would read the wrong memory — {ADVICE}")


def read_blocks(blocks: np.ndarray, words: np.ndarray, base: int) -> np.ndarray:
    """The blocks (offset, size rows) that contain at least one of ``words`` (sorted absolute addresses): the
    live tensors the graphs' arguments point into."""
    if not len(blocks) or not len(words):
        return np.zeros((0, 2), "<u8")
    lo = blocks[:, 0].astype(np.uint64) + np.uint64(base)
    first = np.searchsorted(words, lo)  # first word at or after each block start
    hit = (first < len(words)) & (words[np.minimum(first, len(words) - 1)] < lo + blocks[:, 1].astype(np.uint64))
    return np.ascontiguousarray(blocks[hit], dtype="<u8")


def check_blocks(trace: schema.AllocationTrace, saved: np.ndarray, live: np.ndarray, rows: np.ndarray) -> None:
    """Refuse (LayoutMismatch) unless every block SAVE's graphs read (``saved``: offset, size) is a live block of
    this process at the same offset with the same size. Segment rows cannot see this: tensors that share a
    segment land elsewhere inside it when they are allocated in another order or with other sizes."""
    if not len(saved):
        return
    have = set(map(tuple, live.tolist()))
    missing = [i for i, b in enumerate(saved.tolist()) if tuple(b) not in have]
    if not missing:
        return
    i = missing[0]
    off, size = (int(x) for x in saved[i])
    over = [b for b in live.tolist() if b[0] < off + size and off < b[0] + b[1]]
    ours = (f"this process holds a {human_bytes(over[0][1])} block at arena+{over[0][0]:#x} there" if over
            else "this process holds no tensor there")
    raise LayoutMismatch(
        f"arena layout differs from SAVE inside its segments: the graphs read a {human_bytes(size)} tensor at "
        f"arena+{off:#x}{_segment_of(off, rows, trace)} ({len(missing)} of {len(saved)} such tensors differ); "
        f"{ours} (allocations that share a segment came in another order or with other sizes) — {ADVICE}")


def _segment_of(offset: int, rows: np.ndarray, trace: schema.AllocationTrace) -> str:
    """' in segment #j ("label")' for the SAVE allocation row that holds ``offset``."""
    idx = np.nonzero(rows["op"] == OP_ALLOC)[0]
    k = int(np.searchsorted(rows["offset"][idx], np.uint64(offset), side="right")) - 1
    if k < 0:
        return ""
    j = int(idx[k])
    names = [f'"{lb.name}"' for lb in trace.labels if lb.first <= j < lb.end]
    return f" in segment #{j}" + (f" ({', '.join(names)})" if names else "")


def live_blocks(pool, base: int) -> np.ndarray:
    """(arena offset, size) of the allocated PyTorch blocks of a ``torch.cuda.MemPool``, sorted (GPU)."""
    import torch

    pool_id = tuple(pool.id)
    out = [(int(b["address"]) - base, int(b["size"])) for seg in torch.cuda.memory_snapshot()
           if tuple(seg.get("segment_pool_id", ())) == pool_id
           for b in seg["blocks"] if b["state"] == "active_allocated"]
    return np.array(sorted(out), dtype="<u8").reshape(-1, 2)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# -- manifest addresses ---------------------------------------------------------------------------------------
def check_addresses(m: schema.Manifest, where: str = "archive") -> None:
    """Everything restore() will write or wrap lies where LOAD restores memory, with consistent sizes:
    snapshots inside the capture region (their blobs of the recorded size), outputs and RNG state inside the
    arena's restored part [base, base + capture_end), tensor shapes/strides/dtypes coherent."""
    base, end = m.arena.base, m.arena.base + m.arena.capture_end
    cap_lo = m.arena.base + m.arena.capture_start

    def inside(lo: int, size: int, a: int, b: int) -> bool:
        return size >= 0 and a <= lo and lo + size <= b

    for s in m.snapshots:
        if not inside(s.address, s.size, cap_lo, end):
            raise ArchiveError(f"{where}: snapshot at {s.address:#x}+{s.size} lies outside the capture region "
                               f"[{cap_lo:#x}, {end:#x}) (corrupt or not made by this foundry)")
        blob = m.blobs.get(s.blob)
        if blob is None or blob.size != s.size:
            raise ArchiveError(f"{where}: snapshot at {s.address:#x} records {s.size} bytes but its blob holds "
                               f"{None if blob is None else blob.size}")
    for g in m.graphs:
        for k, t in enumerate(g.outputs):
            problem = tensor_problem(t)
            if problem is None and not inside(t.address, t.storage_bytes, base, end):
                problem = f"lies outside the restored arena [{base:#x}, {end:#x})"
            if problem:
                raise ArchiveError(f"{where}: graph {g.key[:60]!r} output {k} at {t.address:#x}: {problem}")
        for r in g.rng:
            for name, addr in (("seed", r.seed_address), ("offset", r.offset_address)):
                if not inside(addr, 8, base, end) or addr % 8:
                    raise ArchiveError(f"{where}: graph {g.key[:60]!r} RNG {name} at {addr:#x} lies outside the "
                                       "restored arena or is misaligned")
            if r.generator != "default" or r.increment < 0 or r.increment % 4:
                raise ArchiveError(f"{where}: graph {g.key[:60]!r} has an unusable RNG record "
                                   f"(generator {r.generator!r}, increment {r.increment})")


#: Element size of every torch dtype a graph output may have (no torch import here; a CPU test compares it with
#: the installed torch). Sub-byte and packed dtypes occupy one byte per element as torch stores them.
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "complex32": 4, "complex64": 8, "complex128": 16, "bcomplex32": 4,
             "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
             "float4_e2m1fn_x2": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bits8": 1, "bits16": 2, "bits1x8": 1,
             "bits2x4": 1, "bits4x2": 1,
             **{f"int{n}": 1 for n in range(1, 8)}, **{f"uint{n}": 1 for n in range(1, 8)}}


def tensor_problem(t: schema.TensorSpec) -> Optional[str]:
    """Why this tensor description is unusable, or None."""
    size = _ITEMSIZE.get(t.dtype)
    if size is None:
        return f"unknown dtype {t.dtype!r}"
    if len(t.shape) != len(t.strides) or any(d < 0 for d in t.shape) or any(s < 0 for s in t.strides):
        return f"inconsistent shape {t.shape} / strides {t.strides}"
    if t.address % size:
        return f"address not aligned to its {t.dtype} elements"
    extent = 0 if 0 in t.shape else 1 + sum((d - 1) * s for d, s in zip(t.shape, t.strides))
    if extent * size > t.storage_bytes:
        return f"shape {t.shape} with strides {t.strides} needs {extent * size} bytes, {t.storage_bytes} recorded"
    return None
