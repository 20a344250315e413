"""The host's kernel-image store: content addressing, verified reads, concurrent writers (real processes),
archives that share images, inspect's shared/own bytes, garbage collection, and the single-file export."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from conftest import returns_within

from foundry_core import schema
from foundry_core.archive import Archive, ArchiveWriter
from foundry_core.cli import main, summarise
from foundry_core.images import StoredImage
from foundry_core.store import STORE_DIRNAME, ImageStore, StoreError, image_bytes, pack_archive, store_images

REPO = Path(__file__).resolve().parents[2]
FP = schema.Fingerprint(gpu_name="NVIDIA H200", compute_capability="9.0", driver_version=13000, cuda_runtime="13.0",
                        torch="2.11.0+cu130", triton="3.6.0", foundry="0.1.0", key="k")


def image(seed: int, size: int = 50_000) -> StoredImage:
    data = b"\x7fELF" + np.random.default_rng(seed).bytes(size)
    return StoredImage(data=data, sha256=hashlib.sha256(data).hexdigest(), kernels=[f"kernel{seed}"])


def save_layout(path: Path, images: list[StoredImage], seed: int, embed: bool = False) -> Path:
    """An archive written the way SAVE writes one: images through ``store_images``, plus this layout's own
    graph tables."""
    rng = np.random.default_rng(seed)
    store = None if embed else ImageStore.beside(path)
    with ArchiveWriter(path) as w:
        records = store_images(w, images, store)
        nodes = np.zeros(40, schema.NODE_DTYPE)  # kernel nodes of the one function, without arguments
        graph = schema.GraphRecord(key=f"decode_bs{seed}", template=0,
                                   nodes=w.add_blob("graph/0/nodes", nodes.tobytes()),
                                   payload=w.add_blob("graph/0/payload", rng.bytes(4000)),
                                   attrs="", num_kernel_nodes=40)
        template = schema.GraphTemplate(num_nodes=40, kinds_sha256="cd" * 32, num_edges=0,
                                        edges=w.add_blob("template/0/edges", bytes(16)))
        manifest = schema.Manifest(
            schema_version=schema.SCHEMA_VERSION, created_utc="2026-11-30T12:00:00Z", fingerprint=FP,
            arena=schema.ArenaLayout(base=0x6A0000000000, size=1 << 30, granularity=2 << 20, capture_start=0,
                                     capture_end=2 << 20),
            blobs={}, images=records, functions=[schema.KernelFunction(image=0, name=images[0].kernels[0])],
            templates=[template], graphs=[graph])
        return w.finish(manifest)


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in (directory / STORE_DIRNAME).iterdir())


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_put_get_is_content_addressed_and_idempotent(tmp_path):
    store = ImageStore(tmp_path / "s")
    img = image(1)
    assert store.put(img.data) == img.sha256 == store.put(img.data)
    assert store.get(img.sha256, len(img.data)) == img.data
    assert sorted(p.name for p in store.root.iterdir()) == [".lock", img.sha256 + ".img"]  # no temporary files
    assert img.sha256 in store and "0" * 64 not in store
    with pytest.raises(StoreError, match="not a sha256"):
        store.get("../../etc/passwd")


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
def test_damaged_or_missing_entries_are_refused_and_put_repairs_them(tmp_path, damage):
    store = ImageStore(tmp_path / "s")
    img = image(2)
    store.put(img.data)
    path = store.path(img.sha256)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[1000] ^= 1
        path.write_bytes(data)
        with pytest.raises(StoreError, match="sha256 mismatch"):
            store.get(img.sha256)
    elif damage == "truncate":
        path.write_bytes(data[:-10])
        with pytest.raises(StoreError, match="truncated or corrupt"):
            store.get(img.sha256, len(img.data))
        with pytest.raises(StoreError, match="truncated or corrupt"):
            store.check([schema.KernelImage(sha256=img.sha256, blob="", size=len(img.data), kernels=[],
                                            in_store=True)])
    else:
        path.unlink()
        with pytest.raises(StoreError, match="missing from the store"):
            store.get(img.sha256)
    store.put(img.data)
    assert store.get(img.sha256, len(img.data)) == img.data


_WRITER = textwrap.dedent("""
    import sys, time, hashlib, numpy as np
    sys.path.insert(0, sys.argv[1])
    from foundry_core.store import ImageStore
    store, me, start = ImageStore(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    shared = [b"\\x7fELF" + np.random.default_rng(s).bytes(200_000 + 5_000 * s) for s in range(12)]
    own = b"\\x7fELF" + np.random.default_rng(1000 + me).bytes(150_000)
    while time.time() < start:
        pass
    for data in shared[me % 3:] + shared[:me % 3] + [own]:
        assert store.put(data) == hashlib.sha256(data).hexdigest()
    print("WROTE", me)
""")

_READER = textwrap.dedent("""
    import sys, time, hashlib, numpy as np
    sys.path.insert(0, sys.argv[1])
    from foundry_core.store import ImageStore, StoreError
    store, start = ImageStore(sys.argv[2]), float(sys.argv[4])
    shas = [hashlib.sha256(b"\\x7fELF" + np.random.default_rng(s).bytes(200_000 + 5_000 * s)).hexdigest()
            for s in range(12)]
    seen = 0
    while time.time() < start + 60 and seen < len(shas):  # generous: 7 processes may share 2 busy cores
        seen = 0
        for sha in shas:
            try:
                store.get(sha)
                seen += 1
            except StoreError as e:
                assert "missing" in str(e), e  # never a partial or damaged file
    print("READ", seen)
""")


def test_concurrent_writer_processes_leave_complete_entries(tmp_path):
    root = tmp_path / "s"
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", script, str(REPO), str(root), str(i), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, script in enumerate([_WRITER] * 6 + [_READER])]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert "READ 12" in outs[-1][0]
    store = ImageStore(root)
    entries = store.entries()
    assert len(entries) == 12 + 6
    assert all(store.get(sha, size) for sha, size in entries.items())
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".img")) == [".lock"]  # no temp files


def test_second_layout_adds_only_its_graph_tables(tmp_path):
    images = [image(i, 200_000) for i in range(4)]
    a = save_layout(tmp_path / "tp1.foundry", images, seed=1)
    after_first = store_bytes(tmp_path)
    b = save_layout(tmp_path / "tp2.foundry", images, seed=2)
    assert store_bytes(tmp_path) == after_first == sum(len(i.data) for i in images)
    (tmp_path / "other").mkdir()
    embedded = save_layout(tmp_path / "other" / "tp2.foundry", images, seed=2, embed=True)
    assert b.stat().st_size < 20_000 < sum(len(i.data) for i in images) < embedded.stat().st_size
    with Archive.open(b) as arch:  # LOAD reads store images, verified
        assert all(im.in_store and im.blob == "" for im in arch.manifest.images)
        assert [image_bytes(arch, im) for im in arch.manifest.images] == [i.data for i in images]
    with Archive.open(embedded) as arch:
        assert [image_bytes(arch, im) for im in arch.manifest.images] == [i.data for i in images]
    assert a.exists()


def test_inspect_reports_shared_and_own_bytes(tmp_path, capsys):
    imgs = [image(i, 10_000 * (i + 1)) for i in range(5)]
    a = save_layout(tmp_path / "a.foundry", imgs[:3], seed=1)
    save_layout(tmp_path / "b.foundry", imgs[1:4], seed=2)
    with Archive.open(a) as arch:
        u = summarise(arch)["image_store"]
    assert (u["store_images"], u["shared_images"], u["own_images"]) == (3, 2, 1)
    assert u["shared_bytes"] == len(imgs[1].data) + len(imgs[2].data) and u["own_bytes"] == len(imgs[0].data)
    assert main(["inspect", str(a)]) == 0
    out = capsys.readouterr().out
    assert "shared with other archives there (2 images)" in out and "own (1 images)" in out
    assert out.count(" store\n") == 3


def test_gc_removes_only_old_unreferenced_images(tmp_path, capsys):
    imgs = [image(i, 20_000) for i in range(6)]
    save_layout(tmp_path / "a.foundry", imgs[0:3], seed=1)
    b = save_layout(tmp_path / "b.foundry", imgs[1:4], seed=2)
    store = ImageStore.beside(b)
    old_orphan, new_orphan = store.put(imgs[4].data), store.put(imgs[5].data)
    for sha in store.entries():
        if sha != new_orphan:
            age(store.path(sha), 7200)
    stale_tmp = store.root / ".tmp-dead.img"
    stale_tmp.write_bytes(b"partial")
    age(stale_tmp, 7200)
    foreign = store.root / "README"
    foreign.write_text("not an image")
    report = store.gc()
    assert report.removed == [old_orphan] and report.spared_recent == 1 and report.kept == 4
    assert report.temp_removed == 1 and not stale_tmp.exists() and foreign.exists()
    age(store.path(imgs[0].sha256), 7200)
    store.put(imgs[0].data)  # a SAVE that reuses an old image makes it recent again (its archive is not written yet)
    assert time.time() - store.path(imgs[0].sha256).stat().st_mtime < 60
    b.unlink()
    assert main(["gc", str(tmp_path), "--grace", "0", "--dry-run"]) == 0
    assert "would remove 2 unreferenced images" in capsys.readouterr().out
    assert len(store.entries()) == 5
    assert main(["gc", str(tmp_path), "--grace", "0"]) == 0
    assert set(store.entries()) == {i.sha256 for i in imgs[0:3]}


def test_gc_refuses_while_an_archive_is_unreadable(tmp_path):
    imgs = [image(i) for i in range(2)]
    save_layout(tmp_path / "a.foundry", imgs[:1], seed=1)
    store = ImageStore(tmp_path / STORE_DIRNAME)
    store.put(imgs[1].data)
    (tmp_path / "broken.foundry").write_bytes(b"FNDRYARC" + bytes(100))
    with pytest.raises(StoreError, match="gc refused: cannot tell which images .*broken.foundry"):
        store.gc(grace_s=0)
    assert len(store.entries()) == 2
    assert main(["gc", str(tmp_path), "--grace", "0"]) == 1


def test_pack_exports_a_self_contained_archive_and_verify_checks_store_images(tmp_path, capsys):
    imgs = [image(i, 30_000) for i in range(3)]
    a = save_layout(tmp_path / "a.foundry", imgs, seed=1)
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    packed = elsewhere / "a.foundry"
    assert main(["pack", str(a), str(packed)]) == 0
    assert not (elsewhere / STORE_DIRNAME).exists()
    with Archive.open(packed) as arch, Archive.open(a) as orig:
        assert not any(im.in_store for im in arch.manifest.images)
        assert [image_bytes(arch, im) for im in arch.manifest.images] == [i.data for i in imgs]
        assert arch.blob("graph/0/payload") == orig.blob("graph/0/payload")
    assert main(["verify", str(packed), "--no-machine-check"]) == 0
    assert main(["verify", str(a), "--no-machine-check"]) == 0
    assert "3 images in the image store intact" in capsys.readouterr().out
    victim = ImageStore.beside(a).path(imgs[2].sha256)
    os.chmod(victim, 0o644)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(data)
    assert main(["verify", str(a), "--no-machine-check"]) == 1
    assert "sha256 mismatch (corrupt image refused)" in capsys.readouterr().err
    with pytest.raises(StoreError, match="corrupt"):
        pack_archive(a, tmp_path / "b.foundry")
    assert not (tmp_path / "b.foundry").exists()


# -- gc beside a concurrent SAVE -------------------------------------------------------------------------------------

_GC_LOOP = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from foundry_core.store import ImageStore
    store, stop = ImageStore(sys.argv[2]), Path(sys.argv[3])
    passes = 0
    while not stop.exists():
        store.gc(grace_s=10)
        passes += 1
    print("GC", passes)
""")


def test_gc_never_deletes_an_image_a_concurrent_save_has_put(tmp_path):
    """Before: put() re-hashed an existing old image, then refreshed its mtime; a gc deciding in between deleted it,
    and the SAVE wrote an archive that refers to a missing image. Here a gc process loops while SAVEs reuse images
    left by older SAVEs (older than the grace period), as in a directory where archives are replaced."""
    store = ImageStore(tmp_path / STORE_DIRNAME)
    store.put(b"warm-up")  # the store exists before gc starts
    stop = tmp_path / "stop"
    gc = subprocess.Popen([sys.executable, "-c", _GC_LOOP, str(REPO), str(store.root), str(stop)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        saved = []
        for i in range(60):
            img = image(100 + i, 4 << 20)
            store.put(img.data)
            age(store.path(img.sha256), 7200)  # left by an older SAVE whose archive is gone
            saved.append((save_layout(tmp_path / f"m{i}.foundry", [img], seed=i), img))
    finally:
        stop.touch()
        out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, err[-2000:]
    missing = [path.name for path, img in saved if img.sha256 not in store]
    assert not missing, f"{len(missing)} of {len(saved)} saved archives refer to a deleted image ({out.strip()})"
    for path, img in saved:
        with Archive.open(path) as archive:
            assert image_bytes(archive, archive.manifest.images[0]) == img.data


# -- reads are bounded: regular files only, no more than recorded -----------------------------------------------------


def _plant(store: ImageStore, sha: str, what: str) -> None:
    path = store.path(sha)
    path.unlink(missing_ok=True)
    if what == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("what", ["fifo", "symlink to /dev/zero"])
def test_an_image_that_is_no_regular_file_is_refused_at_once(tmp_path, what):
    """Before: a FIFO made get() hang; a symlink to /dev/zero read until MemoryError."""
    img = image(7)
    store = ImageStore(tmp_path / "s")
    store.put(img.data)
    _plant(store, img.sha256, what)
    for size in (len(img.data), None):
        with pytest.raises(StoreError, match="not a regular file"):
            returns_within(10, store.get, img.sha256, size)
    with pytest.raises(StoreError, match="not a regular file"):
        store.check([msgspec.structs.replace(img.record(""), in_store=True)])
    assert returns_within(10, store.put, img.data) == img.sha256  # put replaces it with the real image
    assert store.get(img.sha256, len(img.data)) == img.data


def test_gc_and_inspect_do_not_hang_on_a_fifo_named_like_an_archive(tmp_path, capsys):
    a = save_layout(tmp_path / "a.foundry", [image(1)], seed=1)
    os.mkfifo(tmp_path / "trap.foundry")
    assert returns_within(20, main, ["gc", str(tmp_path), "--grace", "0"]) == 1
    err = capsys.readouterr().err
    assert "gc refused" in err and "trap.foundry" in err and "not a regular file" in err
    assert returns_within(20, main, ["inspect", str(a)]) == 0
    assert "1 unreadable archives not counted" in capsys.readouterr().out


def test_gc_keeps_the_images_only_a_rank_variant_uses(tmp_path):
    """A rank template stores a rank whose kernels differ from rank 0's as a variant; the store images of that
    rank alone (a rank-specialised JIT kernel) belong to the template: gc keeps them, pack embeds them."""
    from foundry_core.ranks import merge_rank_archives

    imgs = [image(i, 20_000) for i in range(3)]
    (tmp_path / "parts").mkdir()
    r0 = save_layout(tmp_path / "parts" / "r0.foundry", imgs[0:2], seed=1)
    r1 = save_layout(tmp_path / "parts" / "r1.foundry", [imgs[0], imgs[2]], seed=1)
    template = tmp_path / "parts" / "tpl.foundry"
    report = merge_rank_archives([r0, r1], template)
    assert list(report.variants) == [1]
    r0.unlink()
    r1.unlink()
    store = ImageStore.beside(template)
    for sha in store.entries():
        age(store.path(sha), 7200)
    assert store.gc().removed == []
    assert set(store.entries()) == {i.sha256 for i in imgs}
    assert summarise(Archive.open(template))["image_store"]["own_images"] == 3
    packed = pack_archive(template, tmp_path / "packed.foundry")
    with Archive.open(packed) as a:
        variant = a.manifest.ranks.variants[0].manifest
        assert not any(im.in_store for im in variant.images)
        assert image_bytes(a, variant.images[1]) == imgs[2].data
