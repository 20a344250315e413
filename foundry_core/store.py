"""One content-addressed kernel-image store per host, shared by the archives beside it.

Archives of different layouts (TP1, TP2, EP2 ...) and models load mostly the same kernel images (about 90 of the
96 MB of an 8B archive). SAVE puts each image into ``<archive dir>/foundry-images/<sha256>.img`` and the archive's
manifest refers to it by hash (``KernelImage.in_store``); an archive then holds only its own graph tables and
snapshots, and N layouts store their images once.

- Names are the sha256 of the contents; a read re-hashes the file and refuses one that does not match. Reads open
  regular files only (never through a symbolic link, never waiting on a FIFO) and read no more than the size the
  archive recorded.
- Writers never expose a partial file: each writes a temporary file of its own (exclusive create), fsyncs it and
  renames it over the final name. Concurrent writers of the same image race harmlessly (same bytes).
- ``gc`` removes images no archive in the directory refers to, sparing recent files (a SAVE in progress has put
  its images but not yet written its archive) and refusing to run while an archive cannot be read. ``put`` and
  ``gc`` share a lock file (``flock`` of ``.lock``): gc never decides about an image between put's check of it
  and the refresh of its mtime.
- ``pack_archive`` exports an archive with its images embedded (the single-file form, for copying elsewhere).
Images are GPU code: the store is trusted input, as archives are; verification protects against damage, not
against someone who can write the directory.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import msgspec

from foundry_core import trust
from foundry_core.archive import Archive, ArchiveWriter, _fsync_dir, read_at
from foundry_core.errors import ArchiveError
from foundry_core.options import Options
from foundry_core.schema import KernelImage, rank_images

log = logging.getLogger(__name__)

STORE_DIRNAME = "foundry-images"
SUFFIX = ".img"
ARCHIVE_GLOB = "*.foundry"
#: gc spares unreferenced files younger than this: a concurrent SAVE writes its images before its archive.
DEFAULT_GRACE_S = 3600.0
_NAME = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".lock"


class StoreError(ArchiveError):
    """An image is missing from the store, damaged, or the store cannot be written (one line)."""


def sha256_of(data) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)  # sha256 of removed images
    freed_bytes: int = 0
    kept: int = 0
    spared_recent: int = 0  # unreferenced but younger than the grace period
    temp_removed: int = 0


class ImageStore:
    """Kernel images by sha256 in one directory. Safe for concurrent readers and writers across processes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def beside(cls, archive_path: str | os.PathLike) -> "ImageStore":
        """The store of the directory that holds ``archive_path``."""
        return cls(Path(archive_path).parent / STORE_DIRNAME)

    def path(self, sha256: str) -> Path:
        if not _NAME.fullmatch(sha256):
            raise StoreError(f"{self.root}: {sha256[:80]!r} is not a sha256 image name")
        return self.root / (sha256 + SUFFIX)

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    # -- writing -------------------------------------------------------------------------------------------
    def put(self, data) -> str:
        """Store ``data`` (bytes-like) and return its sha256. An intact existing copy is kept (its mtime refreshed,
        so ``gc`` spares it for the grace period); a damaged one is replaced."""
        view = memoryview(data).cast("B")
        sha = sha256_of(view)
        final = self.path(sha)
        with self._lock(exclusive=False):  # gc cannot decide about this image between the check and the refresh
            if self._intact(final, sha, len(view)):
                with contextlib.suppress(OSError):
                    os.utime(final)  # fresh again: gc spares it until this SAVE's archive refers to it
                return sha
            try:
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=SUFFIX, dir=self.root)  # O_EXCL, unique
            except OSError as err:
                raise StoreError(f"{self.root}: cannot write the image store: {err.strerror or err}") from None
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(view)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)  # atomic: readers see no file or the whole file
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise StoreError(f"{final}: cannot write: {err.strerror or err}") from None
        _fsync_dir(self.root)
        return sha

    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """``flock`` of ``ROOT/.lock``: ``put`` holds it shared from its check of an image to the refresh of its
        mtime (or its write), ``gc`` exclusively while it decides and deletes."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(self.root / _LOCK_NAME, flags, 0o644)
        except OSError as err:
            raise StoreError(f"{self.root}: cannot lock the image store: {err.strerror or err}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"{self.root / _LOCK_NAME}: not a regular file; remove it")
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- reading -------------------------------------------------------------------------------------------
    def get(self, sha256: str, size: Optional[int] = None) -> bytes:
        """The image's bytes, re-hashed; StoreError if it is missing, truncated, damaged or not a regular file."""
        path = self.path(sha256)
        data = _read_regular(path, size)
        if sha256_of(data) != sha256:
            raise StoreError(f"{path}: sha256 mismatch (corrupt image refused)")
        return data

    def check(self, images: Iterable[KernelImage]) -> None:
        """Cheap presence check (a regular file of the recorded size) of an archive's store images, for open()."""
        for image in images:
            if not image.in_store:
                continue
            path = self.path(image.sha256)
            try:
                st = os.lstat(path)
            except OSError:
                raise StoreError(f"{path}: kernel image missing from the store") from None
            _check_regular(path, st, image.size)

    def entries(self) -> dict[str, int]:
        """sha256 -> size of every image file (regular files only)."""
        out = {}
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.suffix == SUFFIX and _NAME.fullmatch(p.stem):
                    with contextlib.suppress(OSError):
                        st = p.lstat()
                        if stat.S_ISREG(st.st_mode):
                            out[p.stem] = st.st_size
        return out

    # -- garbage collection --------------------------------------------------------------------------------
    def gc(self, archives: Optional[Sequence[str | os.PathLike]] = None, grace_s: float = DEFAULT_GRACE_S,
           dry_run: bool = False) -> GcReport:
        """Remove images no archive refers to (default: every ``*.foundry`` beside the store) and stale temporary
        files, except those younger than ``grace_s``. Refuses (StoreError) if an archive cannot be read."""
        paths = [Path(a) for a in archives] if archives is not None else self.archives_beside()
        referenced: set[str] = set()
        for p in paths:
            try:
                referenced |= {im.sha256 for im in read_images(p) if im.in_store}
            except ArchiveError as err:
                raise StoreError(f"gc refused: cannot tell which images {p} needs ({err})") from None
        report = GcReport()
        if not self.root.is_dir():
            return report
        with self._lock(exclusive=True):
            self._collect(referenced, grace_s, dry_run, report)
        return report

    def _collect(self, referenced: set[str], grace_s: float, dry_run: bool, report: GcReport) -> None:
        """gc's decisions and deletions (under the exclusive lock)."""
        now = time.time()
        for p in sorted(self.root.iterdir()):
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue  # a concurrent writer renamed it away
            recent = now - st.st_mtime < grace_s
            if p.name.startswith(_TMP_PREFIX):
                if not recent:
                    report.temp_removed += 1
                    if not dry_run:
                        with contextlib.suppress(OSError):
                            p.unlink()
                continue
            if p.suffix != SUFFIX or not _NAME.fullmatch(p.stem):
                continue  # not ours
            if p.stem in referenced:
                report.kept += 1
            elif recent:
                report.spared_recent += 1
            else:
                report.removed.append(p.stem)
                report.freed_bytes += st.st_size
                if not dry_run:
                    with contextlib.suppress(OSError):
                        p.unlink()

    def archives_beside(self) -> list[Path]:
        """The archives that share this store: ``*.foundry`` in its parent directory."""
        return sorted(self.root.parent.glob(ARCHIVE_GLOB))

    @staticmethod
    def _intact(path: Path, sha256: str, size: int) -> bool:
        try:
            return sha256_of(_read_regular(path, size)) == sha256
        except ArchiveError:
            return False


def _check_regular(path: Path, st: os.stat_result, size: Optional[int]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: not a regular file (a symbolic link, FIFO or device); refused")
    if size is not None and st.st_size != size:
        raise StoreError(f"{path}: {st.st_size} bytes, the archive recorded {size} (truncated or corrupt)")


def _read_regular(path: Path, size: Optional[int]) -> bytes:
    """The bytes of the regular file ``path``, opened without following a symbolic link or waiting on a FIFO, and
    never more than it held when opened (which must be ``size`` when given)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StoreError(f"{path}: kernel image missing from the store (removed, or the archive was copied "
                         f"without it; export with 'python -m foundry_core pack')") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StoreError(f"{path}: not a regular file (a symbolic link, FIFO or device); refused") from None
        raise StoreError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        _check_regular(path, st, size)
        return read_at(fd, 0, st.st_size, str(path))
    finally:
        os.close(fd)


def store_images(writer, images, store: Optional[ImageStore]) -> list[KernelImage]:
    """SAVE: manifest records for ``images`` (objects with ``sha256``, ``data``, ``record(blob)``), put into
    ``store`` when given, else embedded as raw blobs of ``writer``."""
    records = []
    for img in images:
        if store is None:
            # Raw, not zlib: LOAD inflating tens of MB would cost more than the disk space saved.
            records.append(img.record(writer.add_blob(f"image/{img.sha256[:16]}", img.data, compress=False)))
            continue
        if store.put(img.data) != img.sha256:
            raise StoreError(f"image {img.sha256[:16]}: contents changed while saving")
        records.append(msgspec.structs.replace(img.record(""), in_store=True))
    return records


def image_bytes(archive, image: KernelImage) -> bytes:
    """LOAD: one image's bytes, from the archive or from the store beside it (verified either way)."""
    if image.in_store:
        return ImageStore.beside(archive.path).get(image.sha256, image.size)
    return archive.blob(image.blob)


def read_images(path: str | os.PathLike) -> list[KernelImage]:
    """The image records of an archive (validated open, manifest only)."""
    with Archive.open(path) as archive:
        return rank_images(archive.manifest)


def store_usage(archive) -> dict:
    """Bytes of an archive's images by where they live: embedded, in the store and shared with at least one other
    archive beside it, or in the store and used by this archive alone."""
    store = ImageStore.beside(archive.path)
    images = rank_images(archive.manifest)
    mine = {im.sha256: im.size for im in images if im.in_store}
    others: set[str] = set()
    unreadable = 0
    other_paths = [p for p in store.archives_beside() if p.resolve() != Path(archive.path).resolve()]
    for p in other_paths:
        try:
            others |= {im.sha256 for im in read_images(p) if im.in_store}
        except ArchiveError:
            unreadable += 1
    present = store.entries()
    shared = {s for s in mine if s in others}
    return {
        "store": str(store.root),
        "embedded_images": len({im.sha256 for im in images if not im.in_store}),
        "embedded_bytes": sum({im.sha256: im.size for im in images if not im.in_store}.values()),
        "store_images": len(mine),
        "shared_images": len(shared),
        "shared_bytes": sum(mine[s] for s in shared),
        "own_images": len(mine) - len(shared),
        "own_bytes": sum(v for s, v in mine.items() if s not in shared),
        "missing_images": sum(s not in present for s in mine),
        "other_archives": len(other_paths),
        "unreadable_archives": unreadable,
    }


def pack_archive(src: str | os.PathLike, dst: str | os.PathLike, options: Optional[Options] = None) -> Path:
    """Export ``src`` as a single-file archive at ``dst`` with every store image embedded (verified on the way).
    The source must pass LOAD's trust check (``trust.check_archive``): the copy is the caller's file, and signed
    when a key is configured. ``options``: how it is read, trusted and signed (default ``Options.from_env()``)."""
    if Path(src).resolve() == Path(dst).resolve():
        raise StoreError(f"{dst}: pack needs a destination other than the source")
    options = options if options is not None else Options.from_env()
    key = trust.configured_key(options)
    with Archive.open(src, options) as archive:
        trust.check_archive(archive, key)  # the copy is this user's (and signed, with a key): only what LOAD trusts
        m = archive.manifest
        with ArchiveWriter(dst, sign_key=key) as writer:
            for name, blob in m.blobs.items():
                writer.add_blob(name, archive.blob(name), compress=blob.codec != "raw")
            def embedded(images: list[KernelImage]) -> list[KernelImage]:
                out = []
                for im in images:
                    if im.in_store:
                        name = writer.add_blob(f"image/{im.sha256[:16]}", image_bytes(archive, im), compress=False)
                        im = msgspec.structs.replace(im, blob=name, in_store=False)
                    out.append(im)
                return out

            if m.ranks is not None and m.ranks.variants:
                variants = [msgspec.structs.replace(v, manifest=msgspec.structs.replace(
                    v.manifest, images=embedded(v.manifest.images))) for v in m.ranks.variants]
                m = msgspec.structs.replace(m, ranks=msgspec.structs.replace(m.ranks, variants=variants))
            return writer.finish(msgspec.structs.replace(m, images=embedded(m.images)))
