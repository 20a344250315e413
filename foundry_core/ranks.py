"""One archive for every rank of a layout: differential capture → template + per-rank byte deltas.

Each rank of a tensor/expert-parallel layout is captured separately (``parts[r]``, same process layout, same
arena), and rank 0 once more (``noise``). Ranks need not all be captured: when every captured rank's delta is
empty (its graphs are rank 0's but for noise), the missing ranks are *derived* with an empty delta — a layout
whose rank-dependent values live in device memory, not in kernel arguments, then costs rank 0, its noise capture
and one more rank as the check, whatever the rank count.

Bytes that differ between the two rank-0 captures are capture noise — uninitialised padding in kernel
arguments — and carry no meaning. :func:`merge_rank_archives` then requires the
ranks to be structurally identical (graphs, topology, kernels, launch shapes, attributes, outputs, slots,
snapshot layout, arena ranges) and stores rank 0's graphs once, plus for every other rank the bytes that differ
from rank 0 outside the noise (``schema.RankDelta``). LOAD applies a rank's delta to the tables before building.

A structural difference is refused with :class:`NotTemplatable` naming the first one: such a layout needs a
per-rank archive, not a template.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import msgspec
import numpy as np

from foundry_core import schema, trust
from foundry_core.archive import Archive, ArchiveWriter
from foundry_core.errors import FoundryError
from foundry_core.options import Options

__all__ = ["NotDerivable", "NotTemplatable", "MergeReport", "merge_rank_archives", "byte_runs"]

log = logging.getLogger("foundry_core.ranks")


class NotTemplatable(FoundryError):
    """The ranks' graphs differ in structure, not only in argument bytes."""


class NotDerivable(NotTemplatable):
    """Ranks were left out, but a captured rank differs from rank 0: every rank must be captured."""


@dataclass
class MergeReport:
    world_size: int
    noise_bytes: int = 0
    delta_bytes: dict[int, int] = field(default_factory=dict)  # rank -> patched bytes
    differing: dict[int, list[str]] = field(default_factory=dict)  # rank -> where (graph/node or snapshot)
    by_kernel: dict[str, int] = field(default_factory=dict)  # kernel name (or "snapshot") -> delta bytes, all ranks
    derived: list[int] = field(default_factory=list)  # ranks not captured: their delta is empty

    def summary(self) -> str:
        deltas = ", ".join(f"rank {r}: {n} B" for r, n in sorted(self.delta_bytes.items()))
        derived = f", ranks {self.derived} derived" if self.derived else ""
        return f"{self.world_size} ranks, noise {self.noise_bytes} B masked, deltas {deltas or 'none'}{derived}"


def byte_runs(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None, gap: int = 8) -> list[tuple[int, int]]:
    """(offset, length) runs where ``b`` differs from ``a`` outside ``mask``; runs closer than ``gap`` merge."""
    diff = a != b
    if mask is not None:
        diff &= ~mask
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
    """Write ``out``: rank 0's archive with a ``RankTemplate`` holding every rank's delta.

    ``parts``: rank r's archive at ``parts[r]`` (a list: every rank; a mapping: the captured ranks, rank 0
    included, of a layout of ``world_size`` ranks — the others are derived, see the module docstring).
    ``noise``: a second capture of rank 0; bytes it changes are masked (never patched, never compared).
    Raises NotTemplatable if any rank differs in structure, or if a rank is missing while a captured one differs.
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
    ref = _structure(m0)
    for who, a in [(f"rank {r}", a) for r, a in archives.items() if r] + (
            [("the second rank-0 capture", noise)] if noise else []):
        other = _structure(a.manifest)
        if other != ref:
            where = (_image_difference(m0, a.manifest) if other["images"] != ref["images"]
                     else _first_difference(ref, other))
            raise NotTemplatable(f"{who} differs from rank 0 in structure: {where}")
    report = MergeReport(world_size=world)

    # Noise mask per table: bytes the second rank-0 capture changed.
    tables: list[tuple[str, int, int]] = []  # (what, graph index or -1, snapshot index or -1)
    for gi, g in enumerate(m0.graphs):
        tables.append(("nodes", gi, -1))
        tables.append(("attrs", gi, -1))
        tables.append(("payload", gi, -1))
    for si in range(len(m0.snapshots)):
        tables.append(("snapshot", -1, si))

    def blob_of(m: schema.Manifest, what: str, gi: int, si: int) -> str:
        if what == "snapshot":
            return m.snapshots[si].blob
        return getattr(m.graphs[gi], what)

    # Rank 0's tables are read (and their sha256 verified) once, not once per rank and per difference.
    base_tables = {t: _u8(base, blob_of(m0, *t)) for t in tables}
    masks: dict[tuple[str, int, int], np.ndarray] = {}
    for t in tables:
        a0 = base_tables[t]
        if noise is not None:
            b = _u8(noise, blob_of(noise.manifest, *t))
            if len(b) != len(a0):
                raise NotTemplatable(f"the second rank-0 capture has a different {t[0]} size in graph/snapshot {t[1:]}")
            masks[t] = a0 != b
            report.noise_bytes += int(masks[t].sum())
        else:
            masks[t] = np.zeros(len(a0), bool)

    deltas = []
    for r, a in ((r, a) for r, a in archives.items() if r):
        patches: list[schema.BytePatch] = []
        where: list[str] = []
        for what, gi, si in tables:
            a0 = base_tables[(what, gi, si)]
            ar = _u8(a, blob_of(a.manifest, what, gi, si))
            if len(ar) != len(a0):
                raise NotTemplatable(f"rank {r}: graph {m0.graphs[gi].key if gi >= 0 else si!r} has a different "
                                     f"{what} size ({len(ar)} vs {len(a0)} bytes)")
            runs = byte_runs(a0, ar, masks[(what, gi, si)])
            if not runs:
                continue
            if what in ("nodes", "attrs"):  # launch shapes, kernels or attributes differ: not a byte delta
                raise NotTemplatable(f"rank {r}: graph {m0.graphs[gi].key!r} differs from rank 0 in its node "
                                     f"{'table' if what == 'nodes' else 'launch attributes'} "
                                     f"(record {runs[0][0] // (64 if what == 'nodes' else 72)})")
            where.append(f"graph {m0.graphs[gi].key!r}" if gi >= 0 else f"snapshot {si}")
            for off, n in runs:
                patches.append(schema.BytePatch(offset=off, data=ar[off:off + n].tobytes(), graph=gi, snapshot=si))
                if what == "payload":
                    nodes = base_tables[("nodes", gi, -1)].view(schema.NODE_DTYPE)
                    name = _kernel_at(nodes, m0, off)
                else:
                    name = "snapshot"
                report.by_kernel[name] = report.by_kernel.get(name, 0) + n
        deltas.append(schema.RankDelta(rank=r, patches=patches))
        report.delta_bytes[r] = sum(len(p.data) for p in patches)
        report.differing[r] = where
    report.derived = [r for r in range(1, world) if r not in archives]
    if report.derived:
        differing = {r: n for r, n in report.delta_bytes.items() if n}
        if differing:
            r, n = next(iter(differing.items()))
            raise NotDerivable(f"rank {r} differs from rank 0 in {n} bytes ({', '.join(report.differing[r][:3])}): "
                                 f"ranks {report.derived} cannot be derived; capture every rank")
        deltas += [schema.RankDelta(rank=r, patches=[]) for r in report.derived]
        deltas.sort(key=lambda d: d.rank)
        report.delta_bytes.update({r: 0 for r in report.derived})

    with ArchiveWriter(out, sign_key=sign_key) as w:
        for name in sorted(m0.blobs):
            w.add_blob(name, base.blob(name), compress=m0.blobs[name].codec != "raw")
        manifest = msgspec.structs.replace(
            m0, ranks=schema.RankTemplate(world_size=world, deltas=deltas, noise_bytes=report.noise_bytes,
                                          layout=dict(layout)))
        w.finish(manifest)
    log.info("foundry: rank template %s: %s", out, report.summary())
    return report
