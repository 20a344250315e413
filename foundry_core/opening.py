"""LOAD's first step, shared by ``Session.open()`` and the early load (``foundry_core.early``): open an archive and
make every check LOAD makes before the arena exists, returning the problem instead of raising it (``auto`` falls
back on it)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from foundry_core import layout, schema, trust
from foundry_core.archive import Archive
from foundry_core.errors import ArchiveError, FoundryError
from foundry_core.fingerprint import check_compatible, current_fingerprint
from foundry_core.options import Options
from foundry_core.store import ImageStore

__all__ = ["OpenedArchive", "open_for_load"]


@dataclass
class OpenedArchive:
    """What :func:`open_for_load` found: the checked archive, or the problem that makes it unusable."""

    archive: Any = None  # archive.Archive; None when there is a problem
    problem: Optional[FoundryError] = None
    saved_trace: Any = None  # SAVE's allocation trace (layout.decode), None when the archive has none
    saved_blocks: Any = None  # SAVE's live blocks before capture (layout.decode_blocks)
    fingerprint: Any = None  # this machine's, when it was computed


def open_for_load(path: Path, key: str, device: int, rank: Optional[int], options: Options,
                  torch_versions: Optional[tuple[str, str]] = None) -> OpenedArchive:
    """Open the archive at ``path`` under ``options`` and make every check LOAD makes before the arena: trust,
    fingerprint (``key``, CUDA ``device``), rank template, allocation trace, image store. A problem is returned, not
    raised. ``torch_versions``: see :func:`foundry_core.fingerprint.current_fingerprint`."""
    if not path.exists():
        return OpenedArchive(problem=ArchiveError(f"{path}: no archive"))
    out = OpenedArchive()
    try:
        out.archive = Archive.open(path, options)
        trust.check_archive(out.archive, trust.configured_key(options))  # before anything of it is used: code
        out.fingerprint = current_fingerprint(key, device, torch_versions)
        check_compatible(out.archive.manifest.fingerprint, out.fingerprint, path)
        ranks = out.archive.manifest.ranks
        if ranks is not None and not (rank is not None and 0 <= rank < ranks.world_size):
            raise ArchiveError(f"{path} is a template for {ranks.world_size} ranks; this process is rank "
                               f"{rank} (pass Session(rank=...))")
        if ranks is not None:  # from here on the archive reads as this rank's: its graphs, images, trace
            try:
                out.archive.manifest = schema.for_rank(out.archive.manifest, rank)
            except ArchiveError as err:
                raise ArchiveError(f"{path}: {err}") from None
        out.archive.check_inflate_budget()  # one budget for everything it decompresses, the trace included
        if out.archive.manifest.trace is not None:  # decoded now so restore() only compares
            budget = out.archive.inflate_budget
            out.saved_trace = layout.decode(out.archive.manifest.trace, str(path), budget)
            out.saved_blocks = layout.decode_blocks(out.archive.manifest.trace, str(path), budget)
        ImageStore.beside(path).check(out.archive.manifest.images)
    except FoundryError as e:
        if out.archive is not None:
            with contextlib.suppress(Exception):
                out.archive.close()
        return OpenedArchive(problem=e, fingerprint=out.fingerprint)
    return out
