"""Hostile archives hit limits, not the interpreter's or the machine's: nesting depth, decompression size and
memory, and the writer's temporary file (CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import msgspec
import pytest
from fuzz_archives import Deep, replace_manifest

from foundry_core import cli, schema
from foundry_core.archive import Archive, ArchiveWriter
from foundry_core.errors import ArchiveError
from foundry_core.options import Options


def _doc(path):
    with Archive.open(path) as archive:
        return msgspec.to_builtins(archive.manifest)


# -- item 9: nesting ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [997, 2000, 5000, 100_000])
def test_manifest_nested_deep_is_an_archive_error(archive_file, depth):
    """Before: RecursionError. Where decoding stops depends on the stack left: an unknown field a few hundred levels
    deep may still be skipped, and then the manifest must be exactly the one without it; 100,000 levels never
    decode. Whatever the depth, only ArchiveError may come out."""
    path, _ = archive_file
    original = _doc(path)
    replace_manifest(path, dict(original, unknown_field=Deep(depth)))
    try:
        decoded = _doc(path)
    except ArchiveError as err:
        assert str(err).endswith("manifest is nested too deep (corrupt)")
    else:
        assert depth < 100_000, "a manifest 100,000 levels deep was accepted"
        assert decoded == original, "skipping the deep unknown field changed the manifest"


def test_cli_reports_a_deep_manifest_in_one_line(archive_file, capsys):
    path, _ = archive_file
    replace_manifest(path, dict(_doc(path), unknown_field=Deep(100_000)))
    assert cli.main(["verify", str(path), "--no-machine-check"]) == cli.EXIT_BAD
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "internal error" not in err and err.count("\n") == 1


def test_auto_mode_falls_back_when_the_manifest_is_nested_deep(archive_file):
    import foundry_core as fc

    path, _ = archive_file
    replace_manifest(path, dict(_doc(path), unknown_field=Deep(100_000)))
    problem = fc.Session(path, mode="auto")._open_archive()  # auto mode saves afresh on any returned problem
    assert isinstance(problem, ArchiveError) and "nested too deep" in str(problem)


# -- item 10: decompression is bounded ----------------------------------------------------------------------------


def _zlib_bomb(path, size: int) -> None:
    """A valid archive whose one blob is `size` zero bytes, zlib-compressed about 1000:1."""
    with ArchiveWriter(path, level=9) as w:
        w.add_blob("zeros", memoryview(bytearray(size)))
        from fuzz_archives import _EMPTY_MANIFEST

        w.finish(_EMPTY_MANIFEST)


_PEAK_PROBE = """
import sys
import numpy as np
from foundry_core import cli
from foundry_core.archive import Archive

def status(field):  # this process's own figures in MiB (ru_maxrss would include the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) // 1024

path, how = sys.argv[1:]
before = status("VmRSS")
if how == "verify":
    rc = cli.main(["verify", path, "--no-machine-check"])
else:  # what LOAD does with a zlib table or snapshot: decompress and keep it
    with Archive.open(path) as archive:
        rc = int(archive.blob_array("zeros", np.uint8).nbytes != (64 << 20))
print(rc, status("VmHWM") - before)
"""


@pytest.mark.parametrize("how, size, limit_mib", [("verify", 256 << 20, 100), ("load", 64 << 20, 64 + 24)])
def test_decompression_peak_memory_is_what_is_kept(tmp_path, how, size, limit_mib):
    """verify keeps nothing: a 0.25 MB file must not take 256 MB (before: it held the whole blob). LOAD keeps the
    blob, once: before, inflate copied its buffer, so the peak was twice the declared size."""
    path = tmp_path / "bomb.foundry"
    _zlib_bomb(path, size)
    assert path.stat().st_size < 512 << 10
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(path), how], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    rc, peak_mib = map(int, out.stdout.split()[-2:])
    assert rc == 0, out.stderr
    assert peak_mib < limit_mib, f"{how} grew by {peak_mib} MiB for {size >> 20} MiB declared"


def _archive_of_images(path, blobs: dict[str, bytes], images: list[str]):
    """An archive whose kernel images are the named blobs (``images`` may name one blob several times)."""
    from fuzz_archives import _EMPTY_MANIFEST

    with ArchiveWriter(path, level=9) as w:
        for name, data in blobs.items():
            w.add_blob(name, data)
        w.finish(msgspec.structs.replace(_EMPTY_MANIFEST, images=[
            schema.KernelImage(sha256="0" * 64, blob=name, size=len(blobs[name]), kernels=[]) for name in images]))
    return path


def test_the_decompression_budget_is_one_total_for_the_archive(tmp_path):
    """Before: each blob was held to the budget on its own, so three blobs just under it took three times it."""
    blobs = {f"zeros/{i}": bytes((6 << 20) + i) for i in range(3)}  # distinct records, 6 MiB each
    path = _archive_of_images(tmp_path / "three.foundry", blobs, list(blobs))
    for read in (lambda a: a.blob("zeros/0"), lambda a: a.verify_all()):
        with Archive.open(path, Options(inflate_budget=16 << 20)) as archive, \
                pytest.raises(ArchiveError, match="together.* declares 18874371 bytes"):
            read(archive)
    with Archive.open(path, Options(inflate_budget=20 << 20)) as archive:
        assert archive.verify_all() == 3 and len(archive.blob("zeros/2")) == (6 << 20) + 2


def test_a_blob_named_many_times_counts_once_per_use(tmp_path):
    """LOAD reads (and keeps) a blob once for every record that names it: 20 images naming one 4 MiB blob hold
    80 MiB, from a file of 4 MiB."""
    path = _archive_of_images(tmp_path / "many.foundry", {"image": os.urandom(4 << 20)}, ["image"] * 20)
    with Archive.open(path, Options(inflate_budget=64 << 20)) as archive, \
            pytest.raises(ArchiveError, match="declares 83886080 bytes"):
        archive.blob("image")


def test_decompression_budget_refuses_large_declared_sizes(tmp_path):
    path = tmp_path / "bomb.foundry"
    _zlib_bomb(path, 8 << 20)
    with Archive.open(path, Options(inflate_budget=4 << 20)) as archive:
        with pytest.raises(ArchiveError, match="decompression budget"):
            archive.blob("zeros")
        with pytest.raises(ArchiveError, match="decompression budget"):
            archive.verify_all()
    with Archive.open(path, Options(inflate_budget=16 << 20)) as archive:
        assert archive.blob("zeros") == bytes(8 << 20)


def test_inflating_more_than_declared_stops_at_the_declared_size(tmp_path):
    path = tmp_path / "a.foundry"
    _zlib_bomb(path, 1 << 20)
    doc = _doc(path)
    stored = doc["blobs"]["zeros"]
    doc["blobs"]["zeros"] = dict(stored, size=4096)  # claims less than the stream holds
    replace_manifest(path, doc)
    with Archive.open(path) as archive, pytest.raises(ArchiveError, match="different size"):
        archive.blob("zeros")
    assert zlib.decompress(path.read_bytes()[stored["offset"]:stored["offset"] + stored["stored_size"]]) \
        == bytes(1 << 20)


# -- item 12: the writer's temporary file -------------------------------------------------------------------------


def test_writer_does_not_follow_a_planted_symlink(tmp_path):
    """Before: ArchiveWriter opened PATH.tmp with O_TRUNC, following a symlink someone planted there."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "model.foundry"
    for name in ("model.foundry.tmp", ".model.foundry.tmp"):
        (tmp_path / name).symlink_to(victim)
    with ArchiveWriter(path) as w:
        w.add_blob("x", b"data")
        from fuzz_archives import _EMPTY_MANIFEST

        w.finish(_EMPTY_MANIFEST)
    assert victim.read_bytes() == b"precious"
    with Archive.open(path) as archive:
        assert archive.blob("x") == b"data"


def test_writer_temporary_file_is_private_and_unique(tmp_path):
    path = tmp_path / "model.foundry"
    a, b = ArchiveWriter(path), ArchiveWriter(path)
    try:
        assert a.tmp_path != b.tmp_path and a.tmp_path.parent == b.tmp_path.parent == tmp_path
        assert a.tmp_path.stat().st_mode & 0o077 == 0
    finally:
        a.abort()
        b.abort()
    assert sorted(os.listdir(tmp_path)) == []


def test_finished_archive_is_not_writable_by_others(tmp_path):
    path = tmp_path / "model.foundry"
    old = os.umask(0)
    try:
        with ArchiveWriter(path) as w:
            from fuzz_archives import _EMPTY_MANIFEST

            w.finish(_EMPTY_MANIFEST)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o022 == 0


def test_cold_start_benchmark_uses_a_fresh_private_work_directory(monkeypatch):
    """Before: a fixed /tmp/foundry-bench, which another user could prepare (or symlink) in advance."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("cold_start", Path(__file__).parents[2] / "bench" / "cold_start.py")
    cold_start = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cold_start)
    monkeypatch.delenv("FOUNDRY_BENCH_WORK", raising=False)
    first, second = cold_start.work_dir(), cold_start.work_dir()
    try:
        assert first != second and first != Path("/tmp/foundry-bench")
        assert first.stat().st_mode & 0o777 == 0o700 and first.stat().st_uid == os.geteuid()
    finally:
        first.rmdir()
        second.rmdir()


def test_graph_without_attributes_payload_or_edges_can_be_saved_and_loaded(tmp_path):
    """"" means "no blob" (SAVE writes it for a graph without launch attributes, arguments or edges); before, the
    writer took it for a missing blob and refused the whole archive."""
    import msgspec
    import numpy as np
    from fuzz_archives import _EMPTY_MANIFEST

    from foundry_core import schema
    from foundry_core.restore import graph_tables

    nodes = np.zeros(1, schema.NODE_DTYPE)
    nodes["kind"] = schema.NODE_EMPTY
    manifest = msgspec.structs.replace(
        _EMPTY_MANIFEST,
        templates=[schema.GraphTemplate(num_nodes=1, kinds_sha256="0" * 64, edges="", num_edges=0)],
        graphs=[schema.GraphRecord(key="g", template=0, nodes="n", payload="", attrs="", num_kernel_nodes=0)])
    path = tmp_path / "bare.foundry"
    with ArchiveWriter(path) as w:
        w.add_blob("n", nodes.tobytes())
        w.finish(manifest)
    with Archive.open(path) as archive:
        tables = graph_tables(archive, archive.manifest, 0)
    assert [len(t) for t in tables] == [1, 0, 0, 0]


@pytest.mark.parametrize("field", ["records", "blocks"])
def test_allocation_trace_inflates_no_more_than_it_declares(field):
    """The manifest's own zlib fields (the allocation trace) are bounded like blobs: a 64 MiB bomb declared as one
    record is refused after at most one record's worth of output. Before: inflated in full, then refused."""
    import tracemalloc

    from foundry_core import layout, schema

    bomb = zlib.compress(bytes(64 << 20), 9)
    trace = schema.AllocationTrace(records=bomb if field == "records" else zlib.compress(bytes(16)), count=1,
                                   compared=1, sha256="0" * 64, blocks=bomb if field == "blocks" else b"",
                                   num_blocks=1, blocks_sha256="0" * 64)
    decode = layout.decode if field == "records" else layout.decode_blocks
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match="trace"):
            decode(trace, "x.foundry")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"decoding a {len(bomb)}-byte field took {peak >> 20} MiB"
