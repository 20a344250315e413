"""The single-file archive: a fixed header, the blobs, then the manifest.

Layout (little-endian)::

    offset 0   magic b"FNDRYARC" | u32 container version | u32 flags (0)
           16  u64 manifest offset | u64 manifest stored size | 32 bytes sha256 of the stored manifest
           64  blobs, each raw or zlib, each starting at a multiple of 64 (gaps are zero bytes)
           end manifest: msgpack of :class:`foundry_core.schema.Manifest`, ending exactly at end of file

:class:`ArchiveWriter` streams blobs into a new temporary file next to ``PATH`` (created exclusively, so a planted
file or symlink is never followed) and, on :meth:`ArchiveWriter.finish`, appends the manifest, patches the header,
fsyncs and renames over ``PATH``; an existing archive is never damaged.
:class:`Archive` reads every byte it uses once, into private memory, and checks that copy: the header and
manifest on open, each blob's sha256 on every read, before anything of it is returned. Nothing it returns is a view
of the file, so changing or truncating the file after its checks changes nothing that was checked (a truncated
read is an ArchiveError, not a SIGBUS). Every problem raises :class:`~foundry_core.errors.ArchiveError` with one
line that names the file and what is wrong.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Iterator, Optional

import msgspec
import numpy as np

from foundry_core import trust, validate
from foundry_core.decompress import check_inflate_budget, inflate, inflate_budget
from foundry_core.errors import ArchiveError
from foundry_core.options import Options
from foundry_core.schema import SCHEMA_VERSION, Blob, Manifest, rank_manifests

__all__ = ["Archive", "ArchiveWriter", "blob_names", "held_bytes"]

log = logging.getLogger(__name__)

MAGIC = b"FNDRYARC"
CONTAINER_VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = 64
assert HEADER.size == HEADER_SIZE
BLOB_ALIGN = 64

#: zlib is kept only when it saves at least this fraction of the raw size: decompressing costs LOAD time,
#: a raw blob is only read.
MIN_SAVING = 1 / 16
#: zlib cannot expand data by more than ~1032:1; a larger declared size is corruption, not a real blob.
MAX_ZLIB_RATIO = 1100
_CHUNK = 4 << 20
_CODECS = ("raw", "zlib")


def _bytes_view(data) -> memoryview:
    """A flat byte view of any C-contiguous buffer (bytes, bytearray, memoryview, numpy array)."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("blob data must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def held_bytes(m: Manifest) -> int:
    """What LOAD holds of an archive's contents at most, as the manifest declares it: every blob counted once per
    use (a record that several graphs or images name is read, and decompressed, for each), store images at their
    recorded size, and the allocation trace; a rank template's variants count in full too. Blob names must have
    been checked to exist."""
    def size(name: str) -> int:
        return max(m.blobs[name].size, 0) if name else 0

    total = 0
    for v in rank_manifests(m):
        total += sum(max(im.size, 0) if im.in_store else size(im.blob) for im in v.images)
        for graph in v.graphs:
            total += size(graph.nodes) + size(graph.payload) + size(graph.attrs)
            total += size(v.templates[graph.template].edges) if 0 <= graph.template < len(v.templates) else 0
        total += sum(size(s.blob) for s in v.snapshots) + sum(size(x.value) for x in v.module_variables)
        total += v.trace.inflated_bytes if v.trace is not None else 0
    return total


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def blob_names(manifest: Manifest) -> dict[str, str]:
    """Every blob name the manifest (and each of its rank variants) refers to, mapped to the category it belongs to
    (for checks and ``inspect``)."""
    names: dict[str, str] = {}
    for m in rank_manifests(manifest):
        for image in m.images:
            if not image.in_store:  # store images live in foundry_core.store, not in the file
                names.setdefault(image.blob, "images")
        for graph in m.graphs:
            names.setdefault(graph.nodes, "graph nodes")
            names.setdefault(graph.payload, "graph payload")
            names.setdefault(graph.attrs, "graph attrs")
        for template in m.templates:
            names.setdefault(template.edges, "templates")
        for snapshot in m.snapshots:
            names.setdefault(snapshot.blob, "snapshots")
        for var in m.module_variables:
            names.setdefault(var.value, "module variables")
    names.pop("", None)  # "" means "no blob": a graph without arguments or launch attributes, a template without edges
    return names


class ArchiveWriter:
    """Writes an archive: ``add_blob`` any number of times, then ``finish(manifest)``.

    Use it as a context manager; if the block raises (or ``finish`` is never reached) the temporary file is
    removed and ``PATH`` is left as it was. ``sign_key`` (``trust.configured_key``): ``finish`` writes
    ``PATH.hmac`` with it; None removes a stale one.
    """

    def __init__(self, path: str | os.PathLike, *, level: int = 1, sign_key: Optional[bytes] = None):
        if not 1 <= level <= 9:
            raise ValueError(f"zlib level must be 1..9, got {level}")
        self.path = Path(path)
        self.level = level
        self.sign_key = sign_key
        self._blobs: dict[str, Blob] = {}
        self._by_content: dict[str, Blob] = {}  # sha256 of the raw data -> its stored record
        self._raw_sha: dict[str, str] = {}  # blob name -> sha256 of its raw data
        self._stored_bytes = 0
        self._raw_bytes = 0
        try:  # a new file of our own (O_EXCL: no symlink or earlier file is followed), renamed over PATH at the end
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as err:
            raise ArchiveError(f"{self.path}: cannot write: {err.strerror or err}") from None
        self.tmp_path = Path(tmp)
        self._file = os.fdopen(fd, "w+b")
        self._done = False
        try:
            self._file.write(bytes(HEADER_SIZE))  # patched by finish()
        except OSError as err:
            self.abort()
            raise ArchiveError(f"{self.tmp_path}: cannot write: {err.strerror or err}") from None

    def __enter__(self) -> "ArchiveWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            if exc_type is None:
                log.warning("%s: writer closed without finish(); nothing written", self.path)
            self.abort()

    @property
    def stored_bytes(self) -> int:
        """Bytes of blob data written so far (after compression and dedupe)."""
        return self._stored_bytes

    def has_blob(self, name: str) -> bool:
        return name in self._blobs

    def add_blob(self, name: str, data, compress: bool = True) -> str:
        """Store ``data`` under ``name`` and return the name.

        Identical contents are stored once: a second name with the same bytes points at the same record.
        Adding the same name twice is allowed only with identical bytes.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"blob name must be a non-empty string, got {name!r}")
        view = _bytes_view(data)
        hasher = hashlib.sha256()
        for chunk in _chunks(view):
            hasher.update(chunk)
        raw_sha = hasher.hexdigest()
        if name in self._blobs:
            if self._raw_sha[name] != raw_sha:
                raise ValueError(f"blob {name!r} was already added with different contents")
            return name
        record = self._by_content.get(raw_sha)
        if record is None:
            record = self._write(view, compress)
            self._by_content[raw_sha] = record
        self._blobs[name] = record
        self._raw_sha[name] = raw_sha
        return name

    def finish(self, manifest: Manifest) -> Path:
        """Write ``manifest`` (its ``blobs`` replaced by the blobs added here), commit the file, return ``PATH``."""
        self._check_open()
        referenced = blob_names(manifest)
        missing = sorted(set(referenced) - set(self._blobs))
        if missing:
            raise ValueError(f"manifest refers to blobs that were never added: {', '.join(map(repr, missing[:5]))}")
        manifest = msgspec.structs.replace(manifest, blobs=dict(self._blobs))
        encoded = msgspec.msgpack.encode(manifest)
        try:
            f = self._file
            offset = f.seek(0, os.SEEK_END)
            f.write(encoded)
            header = HEADER.pack(MAGIC, CONTAINER_VERSION, 0, offset, len(encoded), hashlib.sha256(encoded).digest())
            f.seek(0)
            f.write(header)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE & ~_umask())  # private while written, then readable
            os.fsync(f.fileno())
            f.close()
            if self.sign_key is not None:
                trust.write_signature(self.path, header, self.sign_key)
            else:
                trust.signature_path(self.path).unlink(missing_ok=True)  # a stale tag would only mislead
            os.replace(self.tmp_path, self.path)
        except OSError as err:
            self.abort()
            raise ArchiveError(f"{self.path}: cannot write: {err.strerror or err}") from None
        self._done = True
        _fsync_dir(self.path.parent)
        log.info(
            "%s: %d blobs (%d records, %.1f MiB stored of %.1f MiB), manifest %.1f KiB",
            self.path, len(self._blobs), len(self._by_content), self._stored_bytes / 2**20,
            self._raw_bytes / 2**20, len(encoded) / 1024,
        )  # fmt: skip
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; ``PATH`` is untouched. Safe to call twice."""
        self._done = True
        try:
            self._file.close()
        except OSError:
            pass
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass

    # -- internals ---------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"{self.path}: writer already finished or aborted")

    def _write(self, view: memoryview, compress: bool) -> Blob:
        f = self._file
        try:
            start = f.seek(0, os.SEEK_END)
            pad = -start % BLOB_ALIGN
            f.write(bytes(pad))
            offset = start + pad
            stored = self._write_zlib(view) if compress and len(view) else None
            if stored is None:
                f.seek(offset)
                f.truncate()
                hasher = hashlib.sha256()
                for chunk in _chunks(view):
                    f.write(chunk)
                    hasher.update(chunk)
                stored = ("raw", len(view), hasher.hexdigest())
        except OSError as err:
            raise ArchiveError(f"{self.tmp_path}: cannot write: {err.strerror or err}") from None
        codec, stored_size, sha = stored
        self._stored_bytes += stored_size
        self._raw_bytes += len(view)
        return Blob(offset=offset, stored_size=stored_size, size=len(view), codec=codec, sha256=sha)

    def _write_zlib(self, view: memoryview) -> tuple[str, int, str] | None:
        """Stream zlib into the file at its end; None (caller rewinds) when it does not save enough."""
        limit = len(view) * (1 - MIN_SAVING)
        packer = zlib.compressobj(self.level)
        hasher = hashlib.sha256()
        stored = 0
        consumed = 0
        for chunk in _chunks(view):
            out = packer.compress(chunk)
            consumed += len(chunk)
            self._file.write(out)
            hasher.update(out)
            stored += len(out)
            # Give up early on data that does not compress (weights, random-looking snapshots).
            if consumed >= _CHUNK and stored > consumed * (1 - MIN_SAVING):
                return None
        out = packer.flush()
        self._file.write(out)
        hasher.update(out)
        stored += len(out)
        return ("zlib", stored, hasher.hexdigest()) if stored <= limit else None


#: Archives are readable by everyone the umask allows and writable only by their owner (LOAD refuses others).
_FILE_MODE = 0o644


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Archive:
    """A validated archive, read through private copies. Reads are thread-safe; open with :meth:`Archive.open`.

    ``options`` are the settings it is read and checked under: its decompression budget (``inflate_budget``) and
    whether LOAD accepts memory targets outside the arena (``allow_foreign_pointers``)."""

    def __init__(self, path: Path, fd: int, file_stat: os.stat_result, header: bytes, manifest_offset: int,
                 manifest: Manifest, options: Optional[Options] = None):
        self.path = path
        self.options = options if options is not None else Options()
        self.file_size = file_stat.st_size
        self.file_stat = file_stat  # of the file as opened: owner and mode for ``trust``
        self.header = header  # what a signature covers (``trust``)
        self.manifest_offset = manifest_offset  # the blob area is [HEADER_SIZE, manifest_offset)
        self.manifest = manifest
        self._fd: int | None = fd
        self._readers = 0  # reads in flight: close() leaves the descriptor to the last of them
        self._closing_fd: int | None = None
        self._lock = threading.Lock()
        self.held_size = held_bytes(manifest)  # one budget covers it all (:meth:`check_inflate_budget`)
        self._budget_checked = False
        self._inflate_budget: Optional[int] = None

    @property
    def inflate_budget(self) -> int:
        """The decompression budget of this archive (``Options.inflate_budget``, else from the available memory
        when first asked)."""
        if self._inflate_budget is None:
            self._inflate_budget = inflate_budget(self.options.inflate_budget)
        return self._inflate_budget

    # -- opening -----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, options: Optional[Options] = None) -> "Archive":
        """Open and validate header, manifest and blob bounds; blob contents are checked when read. ``options``:
        see the class (default ``Options()``: the defaults)."""
        path = Path(path)
        try:  # O_NONBLOCK: a FIFO planted under an archive's name must not block the open
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except IsADirectoryError:
            raise ArchiveError(f"{path}: is a directory, not an archive") from None
        except OSError as err:
            raise ArchiveError(f"{path}: cannot open: {err.strerror or err}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f"{path}: is a directory, not an archive")
            if not stat.S_ISREG(st.st_mode):
                raise ArchiveError(f"{path}: is not a regular file (a FIFO, device or socket), not an archive")
            if st.st_size < HEADER_SIZE:
                raise ArchiveError(f"{path}: truncated: {st.st_size} bytes, smaller than the {HEADER_SIZE}-byte header")
            header = read_at(fd, 0, HEADER_SIZE, str(path))
            manifest_offset, manifest = _read_manifest(path, fd, header, st.st_size)
            _check_manifest(path, manifest, manifest_offset)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, st, header, manifest_offset, manifest, options)

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file. What was read from it stays valid (it is private memory)."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None and not self._readers:
                os.close(fd)
            elif fd is not None:
                self._closing_fd = fd  # the last read in flight closes it

    # -- reading -----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.manifest.blobs)

    def info(self, name: str) -> Blob:
        """The stored record of blob ``name``."""
        try:
            return self.manifest.blobs[name]
        except KeyError:
            raise ArchiveError(f"{self.path}: no blob named {name!r}") from None

    def blob(self, name: str) -> bytes | bytearray:
        """The blob's original bytes: read once into private memory, sha256-checked, decompressed, size-checked."""
        record = self.info(name)
        self.check_inflate_budget()
        stored = self._stored(name, record)
        if record.codec == "raw":
            return stored
        return self._inflate(name, record, stored)

    def blob_array(self, name: str, dtype) -> np.ndarray:
        """The blob as a read-only 1-D array of ``dtype`` records, over the checked private copy (no second copy)."""
        dtype = np.dtype(dtype)
        record = self.info(name)
        if record.size % dtype.itemsize:
            raise ArchiveError(
                f"{self.path}: blob {name!r} has {record.size} bytes, not a whole number of "
                f"{dtype.itemsize}-byte records"
            )
        array = np.frombuffer(self.blob(name), dtype=dtype)
        array.flags.writeable = False
        return array

    def verify_all(self, progress: bool = False) -> int:
        """Check every blob (sha256, decompression, size, the one decompression budget) and that the gaps between
        blobs are zero.

        Returns the number of stored records checked. With ``progress`` a tqdm bar shows the bytes read.
        """
        self.check_inflate_budget()
        records: dict[tuple[int, int], tuple[str, Blob]] = {}
        for name, record in self.manifest.blobs.items():
            records.setdefault((record.offset, record.stored_size), (name, record))
        ordered = sorted(records.values(), key=lambda item: item[1].offset)
        total = sum(record.stored_size for _, record in ordered)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", leave=False)
        try:
            for name, record in ordered:
                stored = self._stored(name, record)
                if record.codec == "zlib":
                    self._inflate(name, record, stored, keep=False)
                if bar is not None:
                    bar.update(record.stored_size)
        finally:
            if bar is not None:
                bar.close()
        self._check_gaps(ordered)
        return len(ordered)

    def check_inflate_budget(self) -> None:
        """ArchiveError unless all LOAD would hold of the archive (:func:`held_bytes`) fits its budget.
        Runs before the first blob is read; LOAD also calls it before decoding the allocation trace."""
        if not self._budget_checked:
            check_inflate_budget(self.held_size, f"{self.path}: all it holds together, counted once per use,",
                                 self.inflate_budget)
            self._budget_checked = True

    # -- internals ---------------------------------------------------------------------------------------

    def _read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the opened file, in memory of this process."""
        with self._lock:
            fd = self._fd
            if fd is None:
                raise ArchiveError(f"{self.path}: archive is closed")
            self._readers += 1
        try:
            return read_at(fd, offset, size, str(self.path))
        finally:
            with self._lock:
                self._readers -= 1
                if self._closing_fd is not None and not self._readers:
                    os.close(self._closing_fd)
                    self._closing_fd = None

    def _stored(self, name: str, record: Blob) -> bytes:
        stored = self._read(record.offset, record.stored_size)
        if hashlib.sha256(stored).hexdigest() != record.sha256:
            raise ArchiveError(f"{self.path}: blob {name!r} sha256 mismatch (corrupt)")
        return stored

    def _inflate(self, name: str, record: Blob, stored: bytes, keep: bool = True) -> bytearray:
        # Each blob on its own too: one that nothing refers to is not in the archive's total.
        return inflate(stored, record.size, f"{self.path}: blob {name!r}", self.inflate_budget, keep)

    def _check_gaps(self, ordered: list[tuple[str, Blob]]) -> None:
        cursor = HEADER_SIZE
        ends = [(record.offset, record.offset + record.stored_size) for _, record in ordered]
        ends.append((self.manifest_offset, self.file_size))
        for start, end in ends:
            for at in range(cursor, start, _CHUNK):
                if any(self._read(at, min(_CHUNK, start - at))):
                    raise ArchiveError(f"{self.path}: bytes {cursor}..{start} between blobs are not zero (corrupt)")
            cursor = max(cursor, end)


def read_at(fd: int, offset: int, size: int, where: str) -> bytes:
    """Exactly ``size`` bytes at ``offset`` of ``fd`` (one copy, into a new bytes object); ArchiveError naming
    ``where`` when the file ends first (truncated, perhaps after it was checked)."""
    try:
        data = os.pread(fd, size, offset)
        if len(data) < size:  # the file ended, or one read returned less (over 2 GiB): read on
            parts = [data]
            got = len(data)
            while got < size:
                part = os.pread(fd, size - got, offset + got)
                if not part:
                    raise ArchiveError(f"{where}: truncated: the file ends before byte {offset + size} "
                                       "(changed after it was opened?)")
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
    except OSError as err:
        raise ArchiveError(f"{where}: cannot read: {err.strerror or err}") from None
    return data


class _VersionProbe(msgspec.Struct):
    """Read the schema version before trusting the rest of the manifest's shape."""

    schema_version: int


def _read_manifest(path: Path, fd: int, header: bytes, size: int) -> tuple[int, Manifest]:
    """Validate the header and decode the manifest (read once, privately); returns (manifest offset, manifest)."""
    magic, version, flags, offset, length, digest = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise ArchiveError(f"{path}: not a foundry archive (bad magic)")
    if version != CONTAINER_VERSION:
        raise ArchiveError(f"{path}: container version {version}, this foundry reads {CONTAINER_VERSION}")
    if flags != 0:
        raise ArchiveError(f"{path}: unknown header flags 0x{flags:x} (corrupt or newer writer)")
    if offset < HEADER_SIZE or offset + length > size:
        raise ArchiveError(f"{path}: truncated: manifest at {offset}+{length} beyond file size {size}")
    if offset + length != size:
        raise ArchiveError(f"{path}: {size - offset - length} unexpected bytes after the manifest (corrupt)")
    raw = read_at(fd, offset, length, str(path))
    if hashlib.sha256(raw).digest() != digest:
        raise ArchiveError(f"{path}: manifest sha256 mismatch (corrupt)")
    try:
        schema = msgspec.msgpack.decode(raw, type=_VersionProbe).schema_version
    except msgspec.DecodeError as err:  # ValidationError is a DecodeError
        raise ArchiveError(f"{path}: manifest is unreadable: {err}") from None
    except RecursionError:  # msgspec skips unknown fields recursively; a real manifest is a few levels deep
        raise ArchiveError(f"{path}: manifest is nested too deep (corrupt)") from None
    if schema != SCHEMA_VERSION:
        raise ArchiveError(f"{path}: schema version {schema}, this foundry reads {SCHEMA_VERSION} — delete the "
                           "archive to save it again with this version")
    try:
        return offset, msgspec.msgpack.decode(raw, type=Manifest, strict=True)
    except msgspec.DecodeError as err:
        raise ArchiveError(f"{path}: manifest is invalid: {err}") from None
    except RecursionError:
        raise ArchiveError(f"{path}: manifest is nested too deep (corrupt)") from None


def _check_manifest(path: Path, manifest: Manifest, blobs_end: int) -> None:
    """Internal consistency: blob bounds and codecs, and every index and blob name the manifest uses."""
    for name, b in manifest.blobs.items():
        where = f"{path}: blob {name!r}"
        if b.codec not in _CODECS:
            raise ArchiveError(f"{where} has unknown codec {b.codec!r}")
        if b.offset < HEADER_SIZE or b.stored_size < 0 or b.offset + b.stored_size > blobs_end:
            raise ArchiveError(
                f"{where} at {b.offset}+{b.stored_size} lies outside the blob area [{HEADER_SIZE}, {blobs_end}) "
                f"(truncated or corrupt)"
            )
        if b.size < 0 or (b.codec == "raw" and b.size != b.stored_size):
            raise ArchiveError(f"{where} is raw but records {b.size} bytes for {b.stored_size} stored")
        if b.codec == "zlib" and b.size > b.stored_size * MAX_ZLIB_RATIO + 64:
            raise ArchiveError(f"{where} claims {b.size} bytes from {b.stored_size} compressed (corrupt)")
        if len(b.sha256) != 64 or b.sha256.strip("0123456789abcdef"):
            raise ArchiveError(f"{where} has a malformed sha256 {b.sha256[:80]!r}")
    for name in blob_names(manifest):
        if name not in manifest.blobs:
            raise ArchiveError(f"{path}: manifest refers to missing blob {name!r}")

    for v in manifest.ranks.variants if manifest.ranks is not None else ():
        if v.manifest.ranks is not None:
            raise ArchiveError(f"{path}: rank {v.rank}'s variant is itself a rank template (corrupt)")
        _check_indices(f"{path}: rank {v.rank}'s variant", v.manifest)
    _check_indices(str(path), manifest)
    validate.check_manifest(str(path), manifest)


def _check_indices(where: str, manifest: Manifest) -> None:
    """Every table index the manifest uses lies in its table, and its arena's capture range in the arena."""
    def check_index(what: str, index: int, count: int, of: str) -> None:
        if not 0 <= index < count:
            raise ArchiveError(f"{where}: {what} refers to {of} {index} of {count} (corrupt)")

    for i, function in enumerate(manifest.functions):
        check_index(f"function {i} ({function.name[:60]!r})", function.image, len(manifest.images), "image")
    for graph in manifest.graphs:
        check_index(f"graph {graph.key[:60]!r}", graph.template, len(manifest.templates), "template")
    for var in manifest.module_variables:
        check_index(f"module variable {var.name[:60]!r}", var.image, len(manifest.images), "image")
        for g, _, _ in var.refs:
            check_index(f"module variable {var.name[:60]!r}", g, len(manifest.graphs), "graph")
    arena = manifest.arena
    if not 0 <= arena.capture_start <= arena.capture_end <= arena.size:
        raise ArchiveError(
            f"{where}: arena capture range [{arena.capture_start}, {arena.capture_end}) "
            f"does not fit the arena size {arena.size}"
        )

