"""One archive for every rank of a layout: differential capture → template + per-rank byte deltas or variants.

Each rank of a tensor/expert-parallel layout is captured separately (``parts[r]``, same process layout, same
arena), and rank 0 once more (``noise``). Ranks need not all be captured: when every captured rank differs from
rank 0 only where capture noise lives (below), the missing ranks are *derived* with an empty delta — a layout
whose rank-dependent values live in device memory, not in kernel arguments, then costs rank 0, its noise capture
and one more rank as the check, whatever the rank count.

Bytes that differ between the two rank-0 captures are capture noise — uninitialised padding in kernel
arguments — and carry no meaning. Padding belongs to a kernel's argument layout, not to one launch, so the noise
of a kernel is every argument offset that is noisy in any of its launches (*kernel noise*): one noise capture sees
a padding byte change in some launches and, by chance, not in others, while another rank's process leaves other
stack bytes there. Kernel noise decides only whether left-out ranks can be derived; the deltas of captured ranks
mask the per-byte noise alone, so what a captured rank stores is exactly its own bytes.

:func:`merge_rank_archives` stores rank 0's graphs once and, for every rank structurally identical to them (graphs,
topology, kernels, launch shapes, attributes, outputs, slots, snapshot layout), the bytes that differ outside the
noise (``schema.RankDelta``). A rank that differs in structure — other kernel code, such as a JIT kernel
specialised for rank 0's zero offset — is stored whole as a *variant* (``schema.RankVariant``), and later ranks
like it become byte deltas on the variant's graphs. LOAD reads the archive as its rank's (``schema.for_rank``)
and applies the rank's delta to the tables before building.

Ranks with another arena are refused with :class:`NotTemplatable`, and so are left-out ranks that cannot be
derived (:class:`NotDerivable`): every rank must then be captured, or keep its own archive.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import msgspec
import numpy as np

from foundry_core import schema, trust
from foundry_core.archive import Archive, ArchiveWriter, blob_names
from foundry_core.errors import FoundryError
from foundry_core.options import Options

__all__ = ["NotDerivable", "NotTemplatable", "MergeReport", "merge_rank_archives", "byte_runs"]

log = logging.getLogger("foundry_core.ranks")


class NotTemplatable(FoundryError):
    """The ranks cannot share one template (another arena, or a second rank-0 capture unlike the first)."""


class NotDerivable(NotTemplatable):
    """Ranks were left out, but a captured rank differs from rank 0: every rank must be captured."""


@dataclass
class MergeReport:
    world_size: int
    noise_bytes: int = 0
    kernel_noise_bytes: int = 0  # argument bytes at a kernel's noisy offsets, beyond the per-byte noise
    beyond_noise: dict[int, int] = field(default_factory=dict)  # rank -> delta bytes outside the kernel noise
    delta_bytes: dict[int, int] = field(default_factory=dict)  # rank -> patched bytes
    differing: dict[int, list[str]] = field(default_factory=dict)  # rank -> where (graph/node or snapshot)
    by_kernel: dict[str, int] = field(default_factory=dict)  # kernel name (or "snapshot") -> delta bytes, all ranks
    derived: list[int] = field(default_factory=list)  # ranks not captured: their delta is empty
    variants: dict[int, str] = field(default_factory=dict)  # rank -> how it differs from rank 0 in structure
    based_on: dict[int, int] = field(default_factory=dict)  # rank -> the variant its delta applies to (not rank 0)

    def summary(self) -> str:
        deltas = ", ".join(f"rank {r}: {n} B" + (f" on rank {self.based_on[r]}" if r in self.based_on else "")
                           for r, n in sorted(self.delta_bytes.items()))
        derived = f", ranks {self.derived} derived" if self.derived else ""
        variants = f", ranks {sorted(self.variants)} stored whole (variants)" if self.variants else ""
        kernel = f" (+{self.kernel_noise_bytes} B at the kernels' noisy offsets)" if self.kernel_noise_bytes else ""
        return (f"{self.world_size} ranks, noise {self.noise_bytes} B masked{kernel}, deltas {deltas or 'none'}"
                f"{derived}{variants}")


def byte_runs(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None, gap: int = 8) -> list[tuple[int, int]]:
    """(offset, length) runs where ``b`` differs from ``a`` outside ``mask``; runs closer than ``gap`` merge."""
    return _runs(_outside(a != b, mask), gap)


def _runs(diff: np.ndarray, gap: int = 8) -> list[tuple[int, int]]:
    """(offset, length) runs of True in ``diff``; runs closer than ``gap`` merge."""
    idx = np.flatnonzero(diff)
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > gap)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def _u8(archive: Archive, name: str) -> np.ndarray:
    return archive.blob_array(name, np.uint8) if name else np.zeros(0, np.uint8)


def _kernel_at(nodes: np.ndarray, m: schema.Manifest, offset: int) -> str:
    """Name of the kernel whose argument bytes hold payload ``offset`` of a graph's ``nodes`` (for reports)."""
    starts = nodes["payload_off"].astype(np.int64)
    hit = np.flatnonzero((starts <= offset) & (offset < starts + nodes["payload_len"]))
    if not len(hit):
        return "?"
    rec = nodes[hit[0]]
    if rec["kind"] == schema.NODE_KERNEL and int(rec["ref"]) < len(m.functions):
        return m.functions[int(rec["ref"])].name
    return schema.NODE_KIND_NAMES.get(int(rec["kind"]), "?")


def _structure(m: schema.Manifest) -> dict:
    """Everything that must be equal across ranks, minus argument/snapshot bytes and blob names."""
    return {
        "arena": msgspec.to_builtins(m.arena),
        "images": [i.sha256 for i in m.images],
        "functions": msgspec.to_builtins(m.functions),
        "templates": [(t.num_nodes, t.kinds_sha256, t.num_edges) for t in m.templates],
        "graphs": [(g.key, g.template, g.num_kernel_nodes, msgspec.to_builtins(g.outputs), g.output_tree,
                    g.output_constants, g.is_child) for g in m.graphs],
        "snapshots": [(s.address, s.size) for s in m.snapshots],
        "slots": msgspec.to_builtins(m.slots),
        "events": m.num_events,
        "extra": m.extra,
    }


def _image_difference(m0: schema.Manifest, mr: schema.Manifest) -> str:
    """How rank r's kernel-image table differs from rank 0's, naming the kernels of the images only one side has."""
    shas0, shasr = [i.sha256 for i in m0.images], [i.sha256 for i in mr.images]
    if sorted(shas0) == sorted(shasr):
        first = next(i for i, (x, y) in enumerate(zip(shas0, shasr)) if x != y)
        return f"the same {len(shas0)} kernel images in another order (from index {first} on)"

    def described(m: schema.Manifest, shas: set) -> str:
        own = [i for i in m.images if i.sha256 in shas]
        names = ", ".join(f"{i.sha256[:12]} ({', '.join(i.kernels[:3]) or 'no entry points'}"
                          f"{', ...' if len(i.kernels) > 3 else ''})" for i in own[:3])
        return f"{len(own)} [{names}{', ...' if len(own) > 3 else ''}]"

    only0, onlyr = set(shas0) - set(shasr), set(shasr) - set(shas0)
    return f"kernel images of its own: {described(mr, onlyr)}; rank 0's not in it: {described(m0, only0)}"


def _difference(m0: schema.Manifest, mr: schema.Manifest) -> str:
    """Where rank r's manifest first differs from rank 0's in structure (for logs and refusals)."""
    a, b = _structure(m0), _structure(mr)
    return _image_difference(m0, mr) if a["images"] != b["images"] else _first_difference(a, b)


def _first_difference(a: dict, b: dict) -> str:
    for k in a:
        if a[k] != b[k]:
            if isinstance(a[k], list) and isinstance(b[k], list) and len(a[k]) == len(b[k]):
                i = next(i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y)
                return f"{k}[{i}]: {str(a[k][i])[:120]} != {str(b[k][i])[:120]}"
            return f"{k}: {str(a[k])[:120]} != {str(b[k])[:120]}"
    return "?"


PartsArg = Union[Sequence[Union[str, Path]], Mapping[int, Union[str, Path]]]


def merge_rank_archives(parts: PartsArg, out: str | Path, noise: Optional[str | Path] = None,
                        layout: Optional[dict[str, str]] = None, world_size: Optional[int] = None,
                        options: Optional[Options] = None) -> MergeReport:
    """Write ``out``: rank 0's archive with a ``RankTemplate`` holding every other rank's delta or variant.

    ``parts``: rank r's archive at ``parts[r]`` (a list: every rank; a mapping: the captured ranks, rank 0
    included, of a layout of ``world_size`` ranks — the others are derived, see the module docstring).
    ``noise``: a second capture of rank 0; bytes it changes are masked (never patched, never compared).
    Raises NotTemplatable if a rank has another arena or the noise capture differs from rank 0 in structure, and
    NotDerivable if a rank is missing while a captured one differs.
    ``options``: how the parts are read and trusted and the template signed (default ``Options.from_env()``: a
    merge runs without a Session).
    """
    by_rank = dict(parts) if isinstance(parts, Mapping) else dict(enumerate(parts))
    if 0 not in by_rank:
        raise FoundryError("merge_rank_archives needs rank 0's archive")
    world = world_size or len(by_rank)
    if any(not 0 <= r < world for r in by_rank):
        raise FoundryError(f"merge_rank_archives: ranks {sorted(by_rank)} do not fit a layout of {world}")
    options = options if options is not None else Options.from_env()
    key = trust.configured_key(options)
    archives = {r: Archive.open(p, options) for r, p in sorted(by_rank.items())}
    noise_archive = Archive.open(noise, options) if noise else None
    opened = list(archives.values()) + ([noise_archive] if noise_archive else [])
    try:
        for a in opened:
            trust.check_archive(a, key)  # the template inherits their code: no part may be less trusted than it
        return _merge(archives, noise_archive, Path(out), layout or {}, world, key)
    finally:
        for a in opened:
            a.close()


def _merge(archives: dict[int, Archive], noise: Optional[Archive], out: Path, layout: dict[str, str],
           world: int, sign_key: Optional[bytes]) -> MergeReport:
    base = archives[0]
    m0 = base.manifest
    report = MergeReport(world_size=world)
    if noise is not None and _structure(noise.manifest) != _structure(m0):
        raise NotTemplatable(f"the second rank-0 capture differs from rank 0 in structure: "
                             f"{_difference(m0, noise.manifest)}")
    bases = {0: _Base(base, _structure(m0), _tables(base))}
    if noise is not None:  # noise mask per table: bytes the second rank-0 capture changed
        for t, a0 in bases[0].tables.items():
            b = _u8(noise, _blob_of(noise.manifest, t))
            if len(b) != len(a0):
                raise NotTemplatable(f"the second rank-0 capture has a different {t[0]} size in graph/snapshot {t[1:]}")
            bases[0].masks[t] = a0 != b
            report.noise_bytes += int(bases[0].masks[t].sum())
        bases[0].wide = _with_kernel_noise(m0, bases[0].tables, bases[0].masks)
        report.kernel_noise_bytes = sum(int(w.sum()) for w in bases[0].wide.values()) - report.noise_bytes

    deltas, variants = [], []
    for r, a in ((r, a) for r, a in archives.items() if r):
        if a.manifest.arena != m0.arena:  # every rank reserves the same arena before it knows its graphs
            raise NotTemplatable(f"rank {r} differs from rank 0 in its arena: {_difference(m0, a.manifest)}")
        found, structure = None, _structure(a.manifest)
        for b, known in bases.items():  # rank 0 first, then the variants in rank order
            found = _delta(r, a, b, known, report) if structure == known.structure else None
            if found is not None:
                deltas.append(found)
                break
        if found is None:  # other kernels, launch shapes or table sizes: this rank's graphs are stored whole
            why = _difference(m0, a.manifest)
            log.info("foundry: rank %d is stored as a variant: it differs from rank 0 in structure: %s", r, why)
            bases[r] = _Base(a, structure, _tables(a))
            variants.append(r)
            report.variants[r] = why
    report.derived = [r for r in range(1, world) if r not in archives]
    if report.derived:
        differing = {r: n for r, n in report.beyond_noise.items() if n}
        if variants:
            raise NotDerivable(f"rank {variants[0]} differs from rank 0 in structure ({report.variants[variants[0]]}): "
                               f"ranks {report.derived} cannot be derived; capture every rank")
        if differing:
            r, n = next(iter(differing.items()))
            raise NotDerivable(f"rank {r} differs from rank 0 in {n} bytes beyond the capture noise "
                               f"({', '.join(report.differing[r][:3])}): ranks {report.derived} cannot be derived; "
                               f"capture every rank")
        deltas += [schema.RankDelta(rank=r, patches=[]) for r in report.derived]
        report.delta_bytes.update({r: 0 for r in report.derived})
    deltas.sort(key=lambda d: d.rank)

    with ArchiveWriter(out, sign_key=sign_key) as w:
        for name in sorted(m0.blobs):
            w.add_blob(name, base.blob(name), compress=m0.blobs[name].codec != "raw")
        stored = []
        for r in variants:  # under names of their own; the writer shares the records whose bytes are equal
            a = archives[r]
            renamed = _renamed_blobs(a.manifest, f"rank{r}/")
            for name in sorted(blob_names(a.manifest)):
                w.add_blob(f"rank{r}/{name}", a.blob(name), compress=a.manifest.blobs[name].codec != "raw")
            stored.append(schema.RankVariant(rank=r, manifest=msgspec.structs.replace(
                renamed, blobs={}, ranks=None, fingerprint=m0.fingerprint)))
        manifest = msgspec.structs.replace(
            m0, ranks=schema.RankTemplate(world_size=world, deltas=deltas, noise_bytes=report.noise_bytes,
                                          layout=dict(layout), variants=stored))
        w.finish(manifest)
    log.info("foundry: rank template %s: %s", out, report.summary())
    return report


@dataclass
class _Base:
    """A rank whose graphs the template stores whole (rank 0, or a variant): what other ranks are compared with."""

    archive: Archive
    structure: dict
    tables: dict  # (what, graph index, snapshot index) -> uint8 bytes
    masks: dict = field(default_factory=dict)  # same keys -> capture noise (rank 0 with a noise capture only)
    wide: dict = field(default_factory=dict)  # the same keys: masks plus the kernel noise (module docstring)


def _blob_of(m: schema.Manifest, table: tuple[str, int, int]) -> str:
    what, gi, si = table
    return m.snapshots[si].blob if what == "snapshot" else getattr(m.graphs[gi], what)


def _tables(a: Archive) -> dict:
    """Every graph's nodes, attributes and arguments and every snapshot of ``a``, as bytes (read and verified once)."""
    m = a.manifest
    keys = [(what, gi, -1) for gi in range(len(m.graphs)) for what in ("nodes", "attrs", "payload")]
    keys += [("snapshot", -1, si) for si in range(len(m.snapshots))]
    return {t: _u8(a, _blob_of(m, t)) for t in keys}


def _delta(r: int, a: Archive, b: int, known: _Base, report: MergeReport) -> Optional[schema.RankDelta]:
    """Rank ``r``'s bytes that differ from base rank ``b``'s outside the noise, or None when they differ in table
    sizes, launch shapes, kernels or attributes (not a byte delta: ``r`` needs graphs of its own)."""
    mb = known.archive.manifest
    patches: list[schema.BytePatch] = []
    where: list[str] = []
    by_kernel: dict[str, int] = {}
    beyond = 0
    for t, ab in known.tables.items():
        what, gi, si = t
        ar = _u8(a, _blob_of(a.manifest, t))
        if len(ar) != len(ab):
            return None
        own = _outside(ab != ar, known.masks.get(t))
        if not own.any():
            continue
        if what in ("nodes", "attrs"):
            return None
        beyond += int(np.count_nonzero(_outside(own, known.wide.get(t))))
        runs = _runs(own)
        where.append(f"graph {mb.graphs[gi].key!r}" if gi >= 0 else f"snapshot {si}")
        for off, n in runs:
            patches.append(schema.BytePatch(offset=off, data=ar[off:off + n].tobytes(), graph=gi, snapshot=si))
            name = (_kernel_at(known.tables[("nodes", gi, -1)].view(schema.NODE_DTYPE), mb, off)
                    if what == "payload" else "snapshot")
            by_kernel[name] = by_kernel.get(name, 0) + n
    for name, n in by_kernel.items():
        report.by_kernel[name] = report.by_kernel.get(name, 0) + n
    report.delta_bytes[r] = sum(len(p.data) for p in patches)
    report.beyond_noise[r] = beyond
    report.differing[r] = where
    if b:
        report.based_on[r] = b
    return schema.RankDelta(rank=r, patches=patches, base=b)


def _outside(diff: np.ndarray, mask: Optional[np.ndarray]) -> np.ndarray:
    return diff if mask is None else diff & ~mask


def _with_kernel_noise(m: schema.Manifest, tables: dict, masks: dict) -> dict:
    """``masks`` with every kernel launch's argument bytes masked at the offsets where that kernel's arguments are
    noisy in any launch (same function, same argument size; see the module docstring)."""
    payloads = [(t, tables[("nodes", t[1], -1)].view(schema.NODE_DTYPE)) for t in masks if t[0] == "payload"]
    noisy: dict[int, np.ndarray] = {}
    for t, nodes in payloads:
        for f, off, n in _kernel_launches(nodes, len(masks[t])):
            seg = masks[t][off:off + n]
            if not seg.any():
                continue
            known = noisy.get(f)
            if known is None:
                noisy[f] = seg.copy()
            elif len(known) == n:  # one function has one argument layout; anything else is left as it is
                known |= seg
    wide = dict(masks)
    for t, nodes in payloads:
        mask = masks[t].copy()
        for f, off, n in _kernel_launches(nodes, len(mask)):
            if f in noisy and len(noisy[f]) == n:
                mask[off:off + n] |= noisy[f]
        wide[t] = mask
    return wide


def _kernel_launches(nodes: np.ndarray, payload_size: int):
    """(function index, argument offset, argument size) of every kernel node whose arguments lie in the payload."""
    kernels = nodes[nodes["kind"] == schema.NODE_KERNEL]
    for f, off, n in zip(kernels["ref"].tolist(), kernels["payload_off"].tolist(), kernels["payload_len"].tolist()):
        if n and off + n <= payload_size:
            yield f, off, n


def _renamed_blobs(m: schema.Manifest, prefix: str) -> schema.Manifest:
    """``m`` with every blob name it refers to prefixed (a variant's names inside the template file)."""
    def name(n: str) -> str:
        return prefix + n if n else n

    rep = msgspec.structs.replace
    return rep(m,
               images=[rep(i, blob=name(i.blob)) for i in m.images],
               graphs=[rep(g, nodes=name(g.nodes), payload=name(g.payload), attrs=name(g.attrs)) for g in m.graphs],
               templates=[rep(t, edges=name(t.edges)) for t in m.templates],
               snapshots=[rep(s, blob=name(s.blob)) for s in m.snapshots],
               module_variables=[rep(v, value=name(v.value)) for v in m.module_variables])
