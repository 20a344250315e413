"""Fuzz the archive reader: whatever the bytes, it succeeds or raises ArchiveError, nothing else."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import msgspec
from conftest import sample_archive
from fuzz_archives import Deep, replace_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foundry_core.archive import MAGIC, Archive
from foundry_core.errors import ArchiveError

# FOUNDRY_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("FOUNDRY_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_WORKDIR = Path(tempfile.mkdtemp(prefix="foundry-fuzz-"))
atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)
_VALID = _WORKDIR / "valid.foundry"
sample_archive(_VALID, graphs=2, nodes=4, image_size=512)
VALID = _VALID.read_bytes()
with Archive.open(_VALID) as _a:
    MANIFEST_DOC = msgspec.to_builtins(_a.manifest)


def read_everything(data: bytes) -> None:
    """Open ``data`` as an archive and touch all of it; only ArchiveError may escape."""
    path = _WORKDIR / "case.foundry"
    path.write_bytes(data)
    _read_path(path)


def _read_path(path: Path) -> None:
    try:
        with Archive.open(path) as archive:
            for name in archive.names():
                archive.blob(name)
                archive.blob_array(name, "u1")
            archive.verify_all()
    except ArchiveError as err:
        assert "\n" not in str(err)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data):
    read_everything(data)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_after_magic(data):
    read_everything(MAGIC + data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_byte_mutations_of_a_valid_archive(flips):
    data = bytearray(VALID)
    for offset, mask in flips:
        data[offset] ^= mask
    read_everything(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID)), st.binary(max_size=64))
def test_splices_of_a_valid_archive(cut, insert):
    read_everything(VALID[:cut] + insert + VALID[cut:])


# Values that stress the decoder's type checks and the manifest's consistency checks, and its nesting limit (a
# manifest thousands of levels deep once escaped as RecursionError; msgspec cannot encode that, Deep can).
_ODD_VALUES = st.one_of(
    st.builds(Deep, st.sampled_from([2, 50, 996, 997, 2000, 100_000]), st.integers(0, 1000)),
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)


def _paths(doc, prefix=()):
    """Every (path, value) in a nested dict/list document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


_MANIFEST_PATHS = [p for p, _ in _paths(MANIFEST_DOC) if p]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_MANIFEST_PATHS), _ODD_VALUES), min_size=1, max_size=4))
def test_field_mutations_with_a_consistent_header(edits):
    """The header's sha256 is recomputed, so mutated manifests reach the decoder and the consistency checks."""
    doc = msgspec.msgpack.decode(msgspec.msgpack.encode(MANIFEST_DOC))  # deep copy
    for path, value in edits:
        node = doc
        try:
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit changed the shape above this path
    case = _WORKDIR / "case.foundry"
    case.write_bytes(VALID)
    replace_manifest(case, doc)
    _read_path(case)
