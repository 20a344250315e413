"""Archive writer/reader and fingerprint checks (CPU)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest
from conftest import FINGERPRINT, returns_within, rewrite_manifest, sample_archive

from foundry_core import schema
from foundry_core.archive import HEADER, Archive, ArchiveWriter
from foundry_core.errors import ArchiveError, IncompatibleArchive
from foundry_core.fingerprint import check_compatible, describe_machine, gpu_unavailable_reason


def _doc(path):
    """The archive's manifest as plain msgpack-able data, for crafting broken variants."""
    with Archive.open(path) as archive:
        return msgspec.to_builtins(archive.manifest)


# -- round trip ----------------------------------------------------------------------------------------------


def test_round_trip_restores_manifest_and_every_blob(archive_file):
    path, blobs = archive_file
    with Archive.open(path) as archive:
        m = archive.manifest
        assert m.schema_version == schema.SCHEMA_VERSION
        assert m.fingerprint == FINGERPRINT
        assert [g.key for g in m.graphs] == ["decode_bs1", "decode_bs2", "decode_bs4"]
        assert m.graphs[2].outputs[0].shape == [4, 4096]
        assert m.functions[0].attributes == {8: 232448}
        assert m.extra == {"kv_pages": "4096"}
        assert set(m.blobs) == set(blobs)
        for name, data in blobs.items():
            assert archive.blob(name) == data, name
        nodes = archive.blob_array("graphs/decode_bs4/nodes", schema.NODE_DTYPE)
        assert nodes.shape == (12,) and (nodes["grid"][:, 0] == 4).all()
        assert archive.verify_all() == len({b.offset for b in m.blobs.values()})


def test_codec_follows_compressibility(archive_file):
    path, _ = archive_file
    with Archive.open(path) as archive:
        blobs = archive.manifest.blobs
        image = next(n for n in blobs if n.startswith("images/"))
        assert blobs[image].codec == "zlib" and blobs[image].stored_size < blobs[image].size
        assert blobs["snapshots/0"].codec == "raw"  # random bytes do not shrink
        assert blobs["snapshots/0"].stored_size == blobs["snapshots/0"].size == 3000
        assert all(b.offset % 64 == 0 for b in blobs.values())


def test_identical_contents_are_stored_once(archive_file):
    path, blobs = archive_file
    with Archive.open(path) as archive:
        attrs = [archive.manifest.blobs[f"graphs/decode_bs{b}/attrs"] for b in (1, 2, 4)]
        assert attrs[0] == attrs[1] == attrs[2]
        assert archive.blob("graphs/decode_bs2/attrs") == blobs["graphs/decode_bs2/attrs"]


def test_blob_array_is_a_read_only_private_copy(archive_file):
    path, blobs = archive_file
    archive = Archive.open(path)
    arr = archive.blob_array("snapshots/0", np.uint8)
    assert not arr.flags.writeable
    assert arr.tobytes() == blobs["snapshots/0"]
    archive.close()  # the array is private memory, not a view of the file
    assert arr.tobytes() == blobs["snapshots/0"]
    with pytest.raises(ArchiveError, match="closed"):
        archive.blob("snapshots/0")


def test_blob_array_rejects_partial_records(archive_file):
    path, _ = archive_file
    with Archive.open(path) as archive, pytest.raises(ArchiveError, match="not a whole number of 64-byte records"):
        archive.blob_array("snapshots/0", schema.NODE_DTYPE)


def test_unknown_blob_name(archive_file):
    path, _ = archive_file
    with Archive.open(path) as archive, pytest.raises(ArchiveError, match="no blob named 'nope'"):
        archive.blob("nope")


def test_writer_blob_rules(tmp_path):
    path = tmp_path / "a.foundry"
    with ArchiveWriter(path) as w:
        assert w.add_blob("x", b"\0" * 1000) == "x"
        assert w.has_blob("x") and not w.has_blob("y")
        assert w.add_blob("x", b"\0" * 1000) == "x"  # same name, same bytes: fine
        with pytest.raises(ValueError, match="different contents"):
            w.add_blob("x", b"\1" * 1000)
        w.add_blob("plain", b"\2" * 1000, compress=False)
        w.add_blob("alias", b"\0" * 1000, compress=False)  # same bytes as "x": shares its record
        w.add_blob("array", np.arange(100, dtype=np.float32))
        w.add_blob("empty", b"")
        w.finish(_minimal_manifest())
    with Archive.open(path) as a:
        assert a.manifest.blobs["x"].codec == "zlib"
        assert a.manifest.blobs["plain"].codec == "raw"
        assert a.manifest.blobs["alias"] == a.manifest.blobs["x"]
        assert a.blob("plain") == b"\2" * 1000
        assert (a.blob_array("array", np.float32) == np.arange(100)).all()
        assert a.blob("empty") == b""
        a.verify_all()


def test_large_blobs_stream_in_chunks(tmp_path):
    path = tmp_path / "big.foundry"
    noise = np.random.default_rng(0).bytes(9 << 20)
    zeros = bytes(9 << 20)
    with ArchiveWriter(path) as w:
        w.add_blob("noise", noise)
        w.add_blob("zeros", zeros)
        w.finish(_minimal_manifest())
    with Archive.open(path) as a:
        assert a.manifest.blobs["noise"].codec == "raw"
        assert a.manifest.blobs["zeros"].codec == "zlib"
        assert a.blob("noise") == noise and a.blob("zeros") == zeros
        assert a.verify_all() == 2


def test_failure_inside_writer_keeps_existing_archive(archive_file):
    path, _ = archive_file
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with ArchiveWriter(path) as w:
            w.add_blob("x", b"123")
            raise RuntimeError("capture failed")
    assert path.read_bytes() == before
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # the writer's temporary file is gone


def test_finish_refuses_missing_blobs_and_cleans_up(tmp_path):
    path = tmp_path / "a.foundry"
    manifest = _minimal_manifest()
    manifest.snapshots = [schema.MemorySnapshot(address=1, size=3, blob="never-added")]
    with pytest.raises(ValueError, match="never-added"):
        with ArchiveWriter(path) as w:
            w.finish(manifest)
    assert not path.exists() and not list(tmp_path.glob(".a.foundry.*.tmp"))


def test_unwritable_destination_is_one_line_archive_error(tmp_path):
    with pytest.raises(ArchiveError, match="cannot write"):
        ArchiveWriter(tmp_path / "missing-dir" / "a.foundry")


def test_concurrent_reads(archive_file):
    path, blobs = archive_file
    with Archive.open(path) as archive:
        names = list(blobs) * 20

        def read(name):
            return name, archive.blob(name)

        with ThreadPoolExecutor(4) as pool:
            for name, data in pool.map(read, names):
                assert data == blobs[name]


# -- a file changed after its checks ---------------------------------------------------------------------------


def _raw_copy(src, dst):
    """``src`` rewritten with every blob stored raw (no decompression copy between the file and the tables)."""
    with Archive.open(src) as archive:
        manifest, blobs = archive.manifest, {n: archive.blob(n) for n in archive.names()}
    with ArchiveWriter(dst) as w:
        for name, data in blobs.items():
            w.add_blob(name, data, compress=False)
        w.finish(manifest)
    return dst


def _write_in_place(path, offset: int, data: bytes) -> None:
    """Overwrite bytes of ``path`` without replacing it, and put its mtime back."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_load_uses_the_bytes_it_checked_when_the_file_is_rewritten_in_place(archive_file, tmp_path):
    """Before: the checked tables were views of a shared mapping, so a rewrite after the checks reached native code
    unchecked (a memset target became 0xdead0000)."""
    from foundry_core import restore

    path = _raw_copy(archive_file[0], tmp_path / "raw.foundry")
    with Archive.open(path) as archive:
        arrays = restore.check_tables_for_load(archive)
        nodes, payload, *_ = arrays[0]
        assert nodes["kind"][0] == schema.NODE_MEMSET
        checked = payload.tobytes()
        record = archive.info(archive.manifest.graphs[0].payload)
        _write_in_place(path, record.offset + int(nodes["payload_off"][0]), (0xDEAD0000).to_bytes(8, "little"))
        assert payload.tobytes() == checked  # what the builder gets is what was checked
        with pytest.raises(ArchiveError, match="sha256 mismatch"):  # a later read checks its own copy again
            restore.check_tables_for_load(archive)


def test_a_blob_read_again_after_an_in_place_change_is_refused(archive_file, tmp_path):
    path = _raw_copy(archive_file[0], tmp_path / "raw.foundry")
    with Archive.open(path) as archive:
        first = archive.blob("snapshots/0")
        _write_in_place(path, archive.info("snapshots/0").offset, b"\xff" * 8)
        with pytest.raises(ArchiveError, match="snapshots/0.*sha256 mismatch"):
            archive.blob("snapshots/0")
    assert first == archive_file[1]["snapshots/0"]


def test_a_file_truncated_while_open_is_an_archive_error_not_sigbus(archive_file):
    """Before: reading through the mapping past the new end of file killed the process (SIGBUS)."""
    path, _ = archive_file
    probe = textwrap.dedent("""
        import os, sys
        from foundry_core.archive import Archive
        from foundry_core.errors import ArchiveError
        archive = Archive.open(sys.argv[1])
        os.truncate(sys.argv[1], 4096)
        try:
            for name in archive.names():
                archive.blob(name)
        except ArchiveError as err:
            print("ArchiveError:", err)
    """)
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-500:]}"
    assert out.stdout.startswith("ArchiveError: ") and "truncated" in out.stdout, out.stdout


def test_fifos_and_devices_are_not_archives(tmp_path):
    """Before: opening a FIFO named like an archive blocked forever (gc and inspect hung)."""
    fifo = tmp_path / "fifo.foundry"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(ArchiveError, match="not a regular file"):
            returns_within(10, Archive.open, path)


# -- damaged files -------------------------------------------------------------------------------------------


def test_truncated_at_many_offsets(archive_file, tmp_path):
    path, _ = archive_file
    data = path.read_bytes()
    cut = tmp_path / "cut.foundry"
    for size in sorted({0, 1, 8, 15, 16, 63, 64, 65, 200, len(data) // 2, len(data) - 100, len(data) - 1}):
        cut.write_bytes(data[:size])
        with pytest.raises(ArchiveError, match="truncated") as err:
            Archive.open(cut)
        assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_truncated_manifest_message_names_sizes(archive_file):
    path, _ = archive_file
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ArchiveError, match=rf"manifest at \d+\+\d+ beyond file size {len(data) - 10}"):
        Archive.open(path)


def test_every_single_byte_flip_is_detected(tmp_path):
    """Header, blobs, padding, manifest: no byte of the file is unchecked by open() + verify_all()."""
    path = tmp_path / "small.foundry"
    sample_archive(path, graphs=1, nodes=3, image_size=256)
    data = path.read_bytes()
    broken = tmp_path / "broken.foundry"
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x10
        broken.write_bytes(mutated)
        with pytest.raises(ArchiveError):
            with Archive.open(broken) as archive:
                archive.verify_all()


def test_blob_bit_flip_names_the_blob(archive_file):
    path, _ = archive_file
    with Archive.open(path) as archive:
        record = archive.manifest.blobs["graphs/decode_bs2/payload"]
    data = bytearray(path.read_bytes())
    data[record.offset + 5] ^= 1
    path.write_bytes(data)
    with Archive.open(path) as archive:  # contents are checked when read
        assert archive.blob("snapshots/0")
        with pytest.raises(ArchiveError, match=r"blob 'graphs/decode_bs2/payload' sha256 mismatch \(corrupt\)"):
            archive.blob("graphs/decode_bs2/payload")
        with pytest.raises(ArchiveError, match="sha256 mismatch"):
            archive.verify_all()


def test_wrong_magic(archive_file):
    path, _ = archive_file
    data = bytearray(path.read_bytes())
    data[:8] = b"PK\x03\x04abcd"
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match=r"not a foundry archive \(bad magic\)"):
        Archive.open(path)


def test_header_field_errors(archive_file):
    path, _ = archive_file
    good = path.read_bytes()
    fields = list(HEADER.unpack_from(good))
    cases = [(1, 2, "container version 2, this foundry reads 1"), (2, 4, "unknown header flags 0x4")]
    for index, value, message in cases:
        bad = bytearray(good)
        f = list(fields)
        f[index] = value
        HEADER.pack_into(bad, 0, *f)
        path.write_bytes(bad)
        with pytest.raises(ArchiveError, match=message):
            Archive.open(path)
    path.write_bytes(good + b"junk")
    with pytest.raises(ArchiveError, match="4 unexpected bytes after the manifest"):
        Archive.open(path)


def test_manifest_sha_mismatch(archive_file):
    path, _ = archive_file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(ArchiveError, match=r"manifest sha256 mismatch \(corrupt\)"):
        Archive.open(path)


def test_schema_version_from_the_future(tmp_path):
    path = tmp_path / "future.foundry"
    manifest = _minimal_manifest()
    manifest.schema_version = 999
    with ArchiveWriter(path) as w:
        w.finish(manifest)
    with pytest.raises(ArchiveError, match=f"schema version 999, this foundry reads {schema.SCHEMA_VERSION}"):
        Archive.open(path)


def test_future_schema_is_reported_before_shape_errors(archive_file):
    path, _ = archive_file
    rewrite_manifest(path, {"schema_version": 7, "something": ["entirely", "different"]})
    with pytest.raises(ArchiveError, match=f"schema version 7, this foundry reads {schema.SCHEMA_VERSION}"):
        Archive.open(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["arena"].__setitem__("base", "0x6a"), r"Expected `int`, got `str` - at `\$.arena.base`"),
        (lambda d: d["graphs"][0].__setitem__("outputs", {}), r"Expected `array`, got `object`"),
        (lambda d: d.pop("fingerprint"), r"missing required field `fingerprint`"),
        (lambda d: d["fingerprint"].__setitem__("driver_version", 13000.0), r"got `float`"),
    ],
)
def test_manifest_type_errors(archive_file, mutate, message):
    path, _ = archive_file
    doc = _doc(path)
    mutate(doc)
    rewrite_manifest(path, doc)
    with pytest.raises(ArchiveError, match="manifest is invalid: .*" + message):
        Archive.open(path)


def test_manifest_that_is_not_a_map(archive_file):
    path, _ = archive_file
    rewrite_manifest(path, [1, 2, 3])
    with pytest.raises(ArchiveError, match="manifest is unreadable"):
        Archive.open(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["blobs"]["snapshots/0"].__setitem__("offset", 10), "lies outside the blob area"),
        (lambda d: d["blobs"]["snapshots/0"].__setitem__("offset", -64), "lies outside the blob area"),
        (lambda d: d["blobs"]["snapshots/0"].__setitem__("stored_size", 1 << 40), "lies outside the blob area"),
        (lambda d: d["blobs"]["snapshots/0"].__setitem__("codec", "lz4"), "unknown codec 'lz4'"),
        (lambda d: d["blobs"]["snapshots/0"].__setitem__("size", 5), "is raw but records 5 bytes"),
        (lambda d: d["blobs"]["snapshots/0"].__setitem__("sha256", "xyz"), "malformed sha256"),
        (lambda d: d["blobs"].pop("snapshots/0"), "refers to missing blob 'snapshots/0'"),
        (lambda d: d["graphs"][1].__setitem__("template", 3), "graph 'decode_bs2' refers to template 3 of 1"),
        (lambda d: d["functions"][0].__setitem__("image", -1), r"function 0 \('k0a'\) refers to image -1 of 2"),
        (lambda d: d["arena"].__setitem__("capture_end", 1 << 50), "arena capture range"),
    ],
)
def test_manifest_consistency_errors(archive_file, mutate, message):
    path, _ = archive_file
    doc = _doc(path)
    mutate(doc)
    rewrite_manifest(path, doc)
    with pytest.raises(ArchiveError, match=message):
        Archive.open(path)


def test_zlib_blob_with_wrong_declared_size(archive_file):
    path, blobs = archive_file
    doc = _doc(path)
    image = next(n for n in doc["blobs"] if n.startswith("images/"))
    doc["blobs"][image]["size"] -= 1
    rewrite_manifest(path, doc)
    with Archive.open(path) as archive, pytest.raises(ArchiveError, match="decompresses to a different size"):
        archive.blob(image)


def test_open_errors_are_one_line(tmp_path):
    with pytest.raises(ArchiveError, match="cannot open: No such file"):
        Archive.open(tmp_path / "missing.foundry")
    with pytest.raises(ArchiveError, match="is a directory"):
        Archive.open(tmp_path)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ArchiveError, match="truncated: 0 bytes"):
        Archive.open(tmp_path / "empty")


# -- fingerprint ---------------------------------------------------------------------------------------------


def test_same_fingerprint_is_compatible():
    check_compatible(FINGERPRINT, FINGERPRINT, "a.foundry")


def test_incompatible_fingerprint_names_every_differing_field():
    other = msgspec.structs.replace(FINGERPRINT, gpu_name="NVIDIA A100-SXM4-80GB", driver_version=12040)
    with pytest.raises(IncompatibleArchive) as err:
        check_compatible(FINGERPRINT, other, "m.foundry")
    assert str(err.value) == (
        "archive m.foundry was saved for gpu_name='NVIDIA H200' driver_version=13000; "
        "this machine has gpu_name='NVIDIA A100-SXM4-80GB' driver_version=12040"
    )


def test_long_key_difference_is_shown_around_the_change():
    base = "qwen3-235b-a22b|" + "x" * 80 + "|tp8|ep8|rank3|" + "y" * 80
    saved = msgspec.structs.replace(FINGERPRINT, key=base)
    current = msgspec.structs.replace(FINGERPRINT, key=base.replace("tp8|ep8", "tp4|ep4"))
    with pytest.raises(IncompatibleArchive) as err:
        check_compatible(saved, current, "m.foundry")
    message = str(err.value)
    assert "\n" not in message and len(message) < 200
    assert re.search(r"saved for key=…'x+\|tp8\|ep8\|rank3\|y+'…; this machine has key=…'x+\|tp4\|ep4", message)
    assert "tp8|ep8" in message and "tp4|ep4" in message
    assert message.count("key=") == 2 and "gpu_name" not in message


def test_ignored_fields():
    other = msgspec.structs.replace(FINGERPRINT, foundry="0.2.0", torch="2.14.1")
    check_compatible(FINGERPRINT, other, "m", ignore=["foundry", "torch"])
    with pytest.raises(IncompatibleArchive, match="torch='2.11.0\\+cu130'; this machine has torch='2.14.1'"):
        check_compatible(FINGERPRINT, other, "m", ignore=["foundry"])
    with pytest.raises(ValueError):
        check_compatible(FINGERPRINT, other, "m", ignore=["colour"])


def test_describe_machine_without_gpu():
    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is present")
    text = describe_machine()
    assert text.startswith("no CUDA GPU usable here: ") and "\n" not in text


def _minimal_manifest() -> schema.Manifest:
    return schema.Manifest(
        schema_version=schema.SCHEMA_VERSION,
        created_utc="2026-11-28T12:00:00Z",
        fingerprint=FINGERPRINT,
        arena=schema.ArenaLayout(base=0x6A0000000000, size=1 << 30, granularity=2 << 20, capture_start=0,
                                 capture_end=0),
        blobs={},
        images=[],
        functions=[],
        templates=[],
        graphs=[],
    )
