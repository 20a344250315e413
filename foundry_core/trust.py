"""Who may have written an archive. LOAD runs the GPU code an archive holds, so an archive is trusted like code.

Without a key, LOAD accepts an archive only if no other user could have written it: the opened file belongs to
this user (or root) and is writable by nobody else. The check runs on the file LOAD actually opened (``fstat``),
so swapping files in the directory afterwards changes nothing.

With a key (``Options.archive_key`` from ``FOUNDRY_ARCHIVE_KEY``, or ``FOUNDRY_ARCHIVE_KEY_FILE`` naming a file that
only its owner can write; :func:`configured_key`), archives may live in directories shared by the deployment's
service accounts: every archive must then carry an HMAC-SHA256 in ``PATH.hmac``, made with that key. SAVE signs
when a key is configured (``ArchiveWriter(sign_key=...)``);
``python -m foundry_core sign`` signs an existing archive. The HMAC covers the 64-byte header, which holds the
manifest's sha256, which holds every blob's sha256, and LOAD verifies each blob before use: one tag covers the
whole file. It proves a key holder wrote the archive; like any signature it does not stop an older archive, also
signed with the key, from being put back in place.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Optional

from foundry_core.errors import UntrustedArchive
from foundry_core.options import ENV, Options

__all__ = ["check_archive", "check_private", "configured_key", "signature_path", "tag", "write_signature"]

log = logging.getLogger("foundry_core.trust")

KEY_ENV = ENV["archive_key"]
KEY_FILE_ENV = ENV["archive_key_file"]
MIN_KEY_BYTES = 16
_TAG_PREFIX = "hmac-sha256:"
_DOMAIN = b"foundry archive header v1\0"


def configured_key(options: Options) -> Optional[bytes]:
    """The archive key ``options`` configure (``archive_key``, else the one in ``archive_key_file``), or None. A key
    file that others can write is refused like an archive."""
    key = options.archive_key
    source = KEY_ENV
    if not key and options.archive_key_file:
        path = Path(options.archive_key_file)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                key = f.read().strip()
        except OSError as e:
            raise UntrustedArchive(f"{KEY_FILE_ENV}={path}: cannot read the archive key: {e.strerror or e}") from None
        _check_owner(st, f"archive key file {path}")
        if st.st_mode & 0o044:
            log.warning("foundry: archive key file %s is readable by other users; they can sign archives", path)
        source = str(path)
    if not key:
        return None
    key = key.encode() if isinstance(key, str) else key
    if len(key) < MIN_KEY_BYTES:
        raise UntrustedArchive(f"the archive key from {source} is {len(key)} bytes; use at least {MIN_KEY_BYTES}")
    return key


def signature_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".hmac")


def tag(header: bytes, key: bytes) -> str:
    return _TAG_PREFIX + hmac.new(key, _DOMAIN + bytes(header), hashlib.sha256).hexdigest()


def write_signature(path: str | os.PathLike, header: bytes, key: bytes) -> Path:
    """Write ``PATH.hmac`` for an archive whose header is ``header`` (atomically, never through a symlink)."""
    target = signature_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(tag(header, key) + "\n")
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_archive(archive, key: Optional[bytes]) -> str:
    """Refuse an opened :class:`~foundry_core.archive.Archive` that LOAD must not trust under the configured ``key``
    (:func:`configured_key`; None: no key); returns how it is trusted."""
    st = archive.file_stat
    if key is None:
        return check_private(archive)
    if st.st_mode & 0o022:
        raise UntrustedArchive(f"{archive.path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                               "`chmod go-w` it")
    try:
        recorded = signature_path(archive.path).read_text().strip()
    except FileNotFoundError:
        raise UntrustedArchive(f"{archive.path} is not signed ({signature_path(archive.path).name} is missing) and "
                               f"{KEY_ENV} is set; sign it with `python -m foundry_core sign`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UntrustedArchive(f"{signature_path(archive.path)}: cannot read the signature: {e}") from None
    if not hmac.compare_digest(recorded, tag(archive.header, key)):
        raise UntrustedArchive(f"{archive.path}: signature does not match (changed since it was signed, or signed "
                               "with another key)")
    return "signed with the configured key"


def check_private(archive, to_sign: bool = False) -> str:
    """Refuse an opened archive that another user could have written (owner other than this user or root, or
    writable by group or others), whatever key is configured; returns how it is trusted. ``sign`` requires this:
    a signature would make another user's file trusted everywhere the key is."""
    _check_owner(archive.file_stat, f"{archive.path}", to_sign)
    return "private to this user (not writable by others)"


def _check_owner(st: os.stat_result, what: str, to_sign: bool = False) -> None:
    sign_only_own = "a signature makes every LOAD with the key trust it, so sign only what this user wrote"
    if st.st_uid not in (os.geteuid(), 0):
        raise UntrustedArchive(f"{what} belongs to uid {st.st_uid}, not this user or root; " + (sign_only_own if to_sign
                               else f"LOAD runs an archive's GPU code, so it loads only what this user wrote (or sign "
                               f"archives: {KEY_ENV})"))
    if st.st_mode & 0o022:
        raise UntrustedArchive(f"{what} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); " + (
            f"`chmod go-w` it first: {sign_only_own}" if to_sign else
            f"LOAD runs an archive's GPU code: `chmod go-w` it, or sign archives for shared use ({KEY_ENV})"))
