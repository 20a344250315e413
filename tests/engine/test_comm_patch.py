"""CPU tests of rank patching: slot descriptors, rank templates (noise mask, deltas, refusals), leftover
placeholders, template keys, and the collective layer the model uses (gloo path unchanged).

The CUDA halves (placeholder kernel, capture into the restored graph on NCCL) run in tests/gpu/check_comm_patch.py.
"""
from __future__ import annotations

import os
import re

import msgspec
import numpy as np
import pytest
import torch
from conftest import rewrite_manifest, sample_archive
from plugin_standins import SlotLog

from foundry_core import schema
from foundry_core.archive import Archive, ArchiveWriter
from foundry_core.errors import ArchiveError, FoundryError, UnsupportedGraph
from foundry_core.ranks import NotTemplatable, byte_runs, merge_rank_archives
from foundry_core.restore import apply_patches, graph_tables, rank_patches
from foundry_core.slots import UnfilledSlot, check_fillable, check_slot_specs
from foundry_sglang.engine import parallel


# -- descriptors -------------------------------------------------------------------------------------------------
@pytest.fixture
def virtual_rank():
    from foundry_sglang.builtin.collectives import PlaceholderCollectives

    log = SlotLog()
    old = parallel.get_state()
    parallel.set_state(parallel.ParallelState(rank=1, world_size=2, tp=2, virtual=True,
                                              collectives=PlaceholderCollectives(log)))
    yield log
    parallel.set_state(old)


def test_collectives_become_ordered_descriptors(virtual_rank):
    x = torch.randn(4, 8)
    assert parallel.tp_all_reduce(x) is x  # in place, untouched (the placeholder does not communicate)
    h = torch.randn(3, 5, dtype=torch.bfloat16)
    out = parallel.tp_all_gather_last(h)
    y = torch.randn(2, 2)
    parallel.all_reduce_world(y)
    ops = [c["op"] for c in virtual_rank.calls]
    assert ops == ["all_reduce", "all_gather", "all_reduce"]  # capture order = slot order
    ar, ag, aw = virtual_rank.calls
    assert ar == dict(op="all_reduce", group="tp", dtype="float32", count=32, send=x.data_ptr(), recv=x.data_ptr(),
                      send_bytes=128, recv_bytes=128, extra={})
    assert ag["group"] == "tp" and ag["dtype"] == "bfloat16" and ag["count"] == 15 and ag["send"] == h.data_ptr()
    assert ag["recv_bytes"] == 2 * 15 * 2 and out.shape == (3, 10)
    assert aw["group"] == "world" and aw["send"] == y.data_ptr()


def test_gather_layout_matches_rank_order():
    """What the gather returns from the buffer the collective fills: rank 0's columns, then rank 1's."""
    parts = [torch.arange(6.0).view(2, 3), 100 + torch.arange(6.0).view(2, 3)]

    class Fake(parallel.Collectives):
        def all_gather(self, out, x, group):
            out.copy_(torch.cat(parts, 0))

    old = parallel.get_state()
    parallel.set_state(parallel.ParallelState(rank=0, world_size=2, tp=2, collectives=Fake()))
    try:
        got = parallel.tp_all_gather_last(parts[0].clone())
    finally:
        parallel.set_state(old)
    assert torch.equal(got, torch.cat(parts, -1))


def test_referenced_slots_refusals():
    from foundry_core.codec import DecodedGraph
    from foundry_core.save import _Entry, _referenced_slots

    def entry(ids, child=False):
        nodes = np.zeros(len(ids) + 1, schema.NODE_DTYPE)
        nodes["kind"][1:] = schema.NODE_SLOT
        nodes["ref"][1:] = ids
        g = DecodedGraph(nodes, b"", np.zeros(0, schema.ATTR_DTYPE), np.zeros(0, schema.EDGE_DTYPE), [], [])
        return _Entry("g", g, child, None, 0.0, [])

    class Rec:
        specs = {i: schema.SlotSpec(id=i, op="all_reduce") for i in (3, 5, 9)}

    assert [s.id for s in _referenced_slots([entry([5, 3])], Rec())] == [3, 5]  # warm-up slot 9 is not saved
    with pytest.raises(UnsupportedGraph, match="twice"):
        _referenced_slots([entry([3]), entry([3])], Rec())
    with pytest.raises(UnsupportedGraph, match="no recorded description"):
        _referenced_slots([entry([4])], Rec())
    with pytest.raises(UnsupportedGraph, match="child graph"):
        _referenced_slots([entry([3], child=True)], Rec())
    with pytest.raises(UnsupportedGraph, match="recorded no slots"):
        _referenced_slots([entry([3])], None)


def test_leftover_placeholders_are_refused_before_anything_is_built():
    m = schema.Manifest(schema_version=1, created_utc="", fingerprint=None, arena=None, blobs={}, images=[],
                        functions=[], templates=[], graphs=[schema.GraphRecord(key="decode_bs8", template=0,
                                                                                nodes="n", payload="", attrs="",
                                                                                num_kernel_nodes=0)],
                        slots=[schema.SlotSpec(id=7, op="all_gather")])
    with pytest.raises(UnfilledSlot, match="decode_bs8.*slot 7, all_gather.*refusing"):
        check_fillable(m, {0: [7]}, None)
    with pytest.raises(ArchiveError, match="slot 8 has no description"):
        check_fillable(m, {0: [7, 8]}, lambda spec: None)
    assert set(check_fillable(m, {0: [7]}, lambda spec: None)) == {7}


def test_slot_buffers_must_lie_in_the_arena():
    lo, hi = 0x1000, 0x2000
    check_slot_specs([schema.SlotSpec(id=1, op="all_reduce", send=0x1000, recv=0x1000, send_bytes=0x1000,
                                      recv_bytes=0x1000)], lo, hi)
    with pytest.raises(Exception, match="recv buffer 0x1f00\\+512 lies outside the arena"):
        check_slot_specs([schema.SlotSpec(id=2, op="all_gather", send=0x1000, recv=0x1F00, send_bytes=8,
                                          recv_bytes=512)], lo, hi)


# -- rank templates ---------------------------------------------------------------------------------------------
def test_byte_runs():
    a = np.zeros(64, np.uint8)
    b = a.copy()
    b[[3, 5, 40]] = 1
    assert byte_runs(a, b) == [(3, 3), (40, 1)]
    mask = np.zeros(64, bool)
    mask[40] = True
    assert byte_runs(a, b, mask) == [(3, 3)]
    assert byte_runs(a, a) == []


def rewrite(src, dst, mutate=None, **manifest_changes):
    """Copy archive ``src`` to ``dst``; ``mutate(name, bytes) -> bytes`` may change blobs."""
    with Archive.open(src) as a:
        m = a.manifest
        with ArchiveWriter(dst) as w:
            for name in m.blobs:
                data = a.blob(name)
                w.add_blob(name, mutate(name, data) if mutate else data)
            w.finish(msgspec.structs.replace(m, **manifest_changes))


def poke(offsets, blob_suffix="decode_bs1/payload", value=0x5A):
    def mutate(name, data):
        if not name.endswith(blob_suffix):
            return data
        b = bytearray(data)
        for o in offsets:
            b[o] ^= value
        return bytes(b)
    return mutate


@pytest.fixture
def ranks(tmp_path):
    r0 = tmp_path / "rank0.foundry"
    sample_archive(r0)
    noise = tmp_path / "noise.foundry"
    rewrite(r0, noise, poke([16, 17]))  # "uninitialised padding": differs between two captures of rank 0
    r1 = tmp_path / "rank1.foundry"

    def rank1(name, data):
        data = poke([16, 40, 41])(name, data)  # 16 is noise, 40-41 a real rank difference
        return poke([5], "snapshots/0", 0x01)(name, data)

    rewrite(r0, r1, rank1)
    return tmp_path, r0, noise, r1


def test_template_holds_rank0_plus_masked_deltas(ranks):
    tmp, r0, noise, r1 = ranks
    out = tmp / "tpl.foundry"
    report = merge_rank_archives([r0, r1], out, noise=noise, layout={"tp": "2"})
    assert report.world_size == 2 and report.noise_bytes == 2
    with Archive.open(out) as t, Archive.open(r0) as a0, Archive.open(r1) as a1:
        m = t.manifest
        assert m.ranks.world_size == 2 and m.ranks.layout == {"tp": "2"} and m.ranks.noise_bytes == 2
        (delta,) = m.ranks.deltas
        assert delta.rank == 1
        assert [(p.graph, p.snapshot, p.offset, len(p.data)) for p in delta.patches] == [(0, -1, 40, 2), (-1, 0, 5, 1)]
        assert report.delta_bytes == {1: 3}
        # LOAD side: rank 1's tables are rank 1's bytes except where capture noise lives
        p1 = graph_tables(t, m, 0, [p for p in rank_patches(m, 1) if p.graph == 0])[1]
        want = a1.blob_array(a1.manifest.graphs[0].payload, np.uint8).copy()
        want[16] = a0.blob_array(a0.manifest.graphs[0].payload, np.uint8)[16]
        assert np.array_equal(p1, want)
        assert rank_patches(m, 0) == [] and rank_patches(m, None) == []
        with pytest.raises(ArchiveError, match="no delta or variant for rank 5"):
            rank_patches(m, 5)


def test_without_noise_capture_padding_becomes_delta(ranks):
    tmp, r0, _, r1 = ranks
    report = merge_rank_archives([r0, r1], tmp / "tpl.foundry")
    assert report.noise_bytes == 0 and report.delta_bytes == {1: 4}  # offsets 16, 40, 41 and the snapshot byte


def differing_rank(r0, bad, what):
    """Rewrite rank-0 archive ``r0`` as a rank that differs from it in structure (``what``), at ``bad``."""
    if what == "grid":
        def mutate(name, data):
            if not name.endswith("decode_bs2/nodes"):
                return data
            nodes = np.frombuffer(data, schema.NODE_DTYPE).copy()
            nodes["grid"][3, 0] += 1
            return nodes.tobytes()
        rewrite(r0, bad, mutate)
    elif what == "extra":
        rewrite(r0, bad, extra={"kv_pages": "2048"})
    elif what == "image":  # a rank-specialised JIT kernel: other code in the same place
        with Archive.open(r0) as a:
            images = [msgspec.structs.replace(a.manifest.images[0], sha256="ab" * 32), *a.manifest.images[1:]]
        rewrite(r0, bad, images=images)
    else:
        with Archive.open(r0) as a:
            snaps = [msgspec.structs.replace(a.manifest.snapshots[0], size=10)]
        rewrite(r0, bad, lambda name, data: data[:10] if name == snaps[0].blob else data, snapshots=snaps)


def rank_tables(archive, rank):
    """What LOAD of ``rank`` builds from: every graph's (nodes, payload, attrs, edges) as bytes, and the images."""
    from foundry_core.restore import check_tables_for_load

    arrays = check_tables_for_load(archive, rank)
    view = schema.for_rank(archive.manifest, rank)
    snapshots = [apply_patches(np.frombuffer(archive.blob(snap.blob), np.uint8),
                               [p for p in rank_patches(view, rank) if p.snapshot == i], "snapshot").tobytes()
                 for i, snap in enumerate(view.snapshots)]
    return [tuple(x.tobytes() for x in arrays[i]) for i in sorted(arrays)], [i.sha256 for i in view.images], snapshots


@pytest.mark.parametrize("what", ["grid", "extra", "image", "snapshot_size"])
def test_a_rank_that_differs_in_structure_is_stored_whole_in_the_template(ranks, what):
    """SGLang's rank 0 compiles other kernel code than rank 1 (its vocabulary window starts at 0); such a rank is
    a variant of the one template: LOAD of it reads exactly its own graphs, rank 0 reads rank 0's."""
    from foundry_core.cli import main

    tmp, r0, _, _ = ranks
    bad = tmp / "bad.foundry"
    differing_rank(r0, bad, what)
    out = tmp / "tpl.foundry"
    report = merge_rank_archives([r0, bad], out)
    assert list(report.variants) == [1] and report.delta_bytes == {}
    with Archive.open(out) as t, Archive.open(r0) as a0, Archive.open(bad) as a1:
        assert rank_tables(t, 0) == rank_tables(a0, None)
        assert rank_tables(t, 1) == rank_tables(a1, None)
        assert (rank_tables(t, 1) == rank_tables(a0, None)) == (what == "extra")
        (variant,) = t.manifest.ranks.variants
        assert variant.rank == 1 and variant.manifest.ranks is None
        assert schema.for_rank(t.manifest, 1).extra == a1.manifest.extra
        # the variant's blobs share the file's records where the bytes are rank 0's
        assert t.file_size < a0.file_size + a1.file_size
    assert main(["verify", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    if what == "image":  # the variant's kernel images are the template's too: kept in a store, embedded by pack
        from foundry_core.store import pack_archive, read_images

        assert "ab" * 32 in {im.sha256 for im in read_images(out)}
        pack_archive(out, tmp / "packed.foundry")
        with Archive.open(tmp / "packed.foundry") as packed, Archive.open(bad) as a1:
            assert rank_tables(packed, 1) == rank_tables(a1, None)


def test_ranks_like_a_variant_are_deltas_on_its_graphs(ranks):
    """TP=3 where rank 0 is special: rank 1 is stored whole, rank 2 as the bytes it differs from rank 1 in."""
    tmp, r0, _, _ = ranks
    r1, r2 = tmp / "v1.foundry", tmp / "v2.foundry"
    differing_rank(r0, r1, "image")
    rewrite(r1, r2, poke([40, 41]))
    out = tmp / "tpl3.foundry"
    report = merge_rank_archives([r0, r1, r2], out)
    assert list(report.variants) == [1] and report.delta_bytes == {2: 2} and report.based_on == {2: 1}
    assert "ranks [1] stored whole" in report.summary() and "rank 2: 2 B on rank 1" in report.summary()
    with Archive.open(out) as t, Archive.open(r2) as a2:
        (delta,) = t.manifest.ranks.deltas
        assert (delta.rank, delta.base) == (2, 1)
        assert rank_tables(t, 2) == rank_tables(a2, None)
        with pytest.raises(ArchiveError, match="rank 3"):
            rank_tables(t, 3)
    with pytest.raises(NotTemplatable, match="derived"):  # a structure of its own cannot be derived
        merge_rank_archives({0: r0, 1: r1}, tmp / "tpl4.foundry", world_size=4)


def test_a_rank_with_another_arena_is_not_templatable(ranks):
    tmp, r0, _, _ = ranks
    bad = tmp / "arena.foundry"
    with Archive.open(r0) as a:
        arena = msgspec.structs.replace(a.manifest.arena, size=a.manifest.arena.size * 2)
    rewrite(r0, bad, arena=arena)
    with pytest.raises(NotTemplatable, match="arena"):
        merge_rank_archives([r0, bad], tmp / "tpl.foundry")
    assert not (tmp / "tpl.foundry").exists()


@pytest.mark.parametrize("tamper", ["base_not_a_variant", "variant_is_a_template", "variant_blob_missing",
                                    "rank_twice", "patch_beyond_the_base"])
def test_a_tampered_variant_is_refused_at_open(ranks, tamper):
    tmp, r0, _, _ = ranks
    r1, r2 = tmp / "v1.foundry", tmp / "v2.foundry"
    differing_rank(r0, r1, "image")
    rewrite(r1, r2, poke([40, 41]))
    good = tmp / "tpl3.foundry"
    merge_rank_archives([r0, r1, r2], good)
    with Archive.open(good) as t:
        ranks_t = t.manifest.ranks
    (variant,), (delta,) = ranks_t.variants, ranks_t.deltas
    rep = msgspec.structs.replace
    if tamper == "base_not_a_variant":
        changed, match = rep(ranks_t, deltas=[rep(delta, base=2)]), "not stored as a variant"
    elif tamper == "variant_is_a_template":
        changed, match = rep(ranks_t, variants=[rep(variant, manifest=rep(variant.manifest, ranks=ranks_t))]), \
            "itself a rank template"
    elif tamper == "variant_blob_missing":
        graphs = [rep(variant.manifest.graphs[0], payload="rank1/nothing"), *variant.manifest.graphs[1:]]
        changed, match = rep(ranks_t, variants=[rep(variant, manifest=rep(variant.manifest, graphs=graphs))]), \
            "missing blob 'rank1/nothing'"
    elif tamper == "rank_twice":
        changed, match = rep(ranks_t, deltas=[delta, rep(delta, rank=1, base=0)]), "at most once"
    else:
        snaps = len(variant.manifest.snapshots)
        changed, match = rep(ranks_t, deltas=[rep(delta, patches=[schema.BytePatch(offset=0, data=b"x",
                                                                                    snapshot=snaps)])]), \
            f"its base has .* {snaps} snapshots"
    bad = tmp / "tampered.foundry"
    bad.write_bytes(good.read_bytes())
    with Archive.open(good) as t:
        rewrite_manifest(bad, msgspec.structs.replace(t.manifest, ranks=changed))
    with pytest.raises(ArchiveError, match=match):
        Archive.open(bad)


def test_patch_outside_table_is_an_archive_error():
    with pytest.raises(ArchiveError, match="outside"):
        apply_patches(np.zeros(8, np.uint8), [schema.BytePatch(offset=6, data=b"abc", graph=0)], "x")
    assert apply_patches(np.zeros(4, np.uint8), [schema.BytePatch(offset=1, data=b"\x07", graph=0)], "x")[1] == 7


# -- keys and the engine path on gloo ------------------------------------------------------------------------------
def test_template_key_has_no_rank_and_ranks_load(tmp_path):
    from foundry_sglang.builtin.backend import FoundryGraphBackend
    from foundry_sglang.engine.config import EngineArgs
    from foundry_sglang.graphs.settings import FoundryConfig

    def backend(rank, **kw):
        args = EngineArgs(model="builtin:tiny", foundry=FoundryConfig.resolve("auto", tmp_path), **kw)
        return FoundryGraphBackend.from_engine_args(args, rank=rank)

    b0, b1 = backend(0, tp=2), backend(1, tp=2)
    assert b0.session.key == b1.session.key and '"rank"' not in b0.session.key
    assert b0.session.path == b1.session.path and "-tp2-" in b0.session.path.name
    assert b0.target.is_template and not backend(0).target.is_template
    assert b1.session.rank == 1 and backend(0).session.rank is None
    assert backend(0, ep=2).session.key != b0.session.key


def test_ranks_left_out_are_derived_when_the_captured_ones_equal_rank_0(ranks):
    tmp, r0, noise, r1 = ranks
    out = tmp / "tpl4.foundry"
    report = merge_rank_archives({0: r0, 3: noise}, out, noise=noise, world_size=4)  # rank 3 == rank 0 but noise
    assert report.derived == [1, 2] and report.delta_bytes == {1: 0, 2: 0, 3: 0}
    with Archive.open(out) as a:
        t = a.manifest.ranks
        assert t.world_size == 4 and [d.rank for d in t.deltas] == [1, 2, 3] and not any(d.patches for d in t.deltas)


def test_ranks_cannot_be_derived_when_a_captured_rank_differs(ranks):
    from foundry_core.ranks import NotDerivable

    tmp, r0, noise, r1 = ranks
    with pytest.raises(NotDerivable, match=r"ranks \[1, 2\] cannot be derived"):
        merge_rank_archives({0: r0, 3: r1}, tmp / "tpl4.foundry", noise=noise, world_size=4)
    assert not (tmp / "tpl4.foundry").exists()
    with pytest.raises(FoundryError, match="rank 0"):
        merge_rank_archives({1: r1}, tmp / "x.foundry", world_size=2)


@pytest.mark.parametrize("rank3_byte, derivable", [
    (6 * 24 + 5, True),    # k0a's launch at node 6, argument byte 5: noisy in its launch at node 3
    (6 * 24 + 6, False),   # the same launch, a byte that is noisy nowhere
    (4 * 24 + 5, False),   # byte 5 of another kernel's launch (k0b at node 4): its own layout, never noisy
])
def test_kernel_noise_lets_ranks_be_derived_only_where_that_kernel_is_noisy(tmp_path, rank3_byte, derivable):
    """Padding is a property of a kernel's argument layout: a byte that is noise in one launch of a kernel is noise
    in all of them, even where the noise capture happened to leave it alone (measured: TP=4 ranks differing from
    rank 0 by 11.7-12.0 KB of torch elementwise/reduce kernel arguments after a per-byte mask)."""
    from foundry_core.ranks import NotDerivable

    r0 = tmp_path / "rank0.foundry"
    sample_archive(r0)  # kernel nodes 1..11, 24 argument bytes each at 24 * i; function i % 3
    noise = tmp_path / "noise.foundry"
    rewrite(r0, noise, poke([3 * 24 + 5]))  # k0a's launch at node 3 of decode_bs1: byte 5 is padding
    r3 = tmp_path / "rank3.foundry"
    rewrite(r0, r3, poke([rank3_byte]))
    out = tmp_path / "tpl4.foundry"
    if not derivable:
        with pytest.raises(NotDerivable, match=r"rank 3 differs from rank 0 in 1 bytes beyond the capture noise"):
            merge_rank_archives({0: r0, 3: r3}, out, noise=noise, world_size=4)
        return
    report = merge_rank_archives({0: r0, 3: r3}, out, noise=noise, world_size=4)
    # k0a launches at nodes 3, 6 and 9 of three graphs: 9 bytes at offset 5, one of them noisy itself
    assert report.noise_bytes == 1 and report.kernel_noise_bytes == 8
    assert report.derived == [1, 2] and report.beyond_noise == {3: 0}
    assert report.delta_bytes == {1: 0, 2: 0, 3: 1}  # a captured rank keeps exactly its own bytes
    assert "(+8 B at the kernels' noisy offsets)" in report.summary()
    with Archive.open(out) as a:
        m = a.manifest
        assert rank_patches(m, 1) == [] and rank_patches(m, 2) == []
        (patch,) = rank_patches(m, 3)
        assert (patch.graph, patch.offset, len(patch.data)) == (0, rank3_byte, 1)


def test_inspect_shows_the_rank_template(ranks, capsys):
    from foundry_core.cli import main

    tmp, r0, noise, r1 = ranks
    merge_rank_archives([r0, r1], tmp / "tpl.foundry", noise=noise, layout={"tp": "2"})
    assert main(["inspect", str(tmp / "tpl.foundry")]) == 0
    out = capsys.readouterr().out
    assert "one template for 2 ranks (tp=2)" in out and "rank 1    delta 2 patches" in out


def test_nvlink_multicast_is_off_in_every_process_we_start(monkeypatch):
    from foundry_sglang.elastic.workers import WorkerSpec, build_env
    from foundry_sglang.engine.config import EngineArgs
    from foundry_sglang.engine.model_runner import init_distributed
    from foundry_sglang.proc import NVLS_OFF_ENV

    env = build_env(WorkerSpec(model="builtin:tiny", device="cuda", tp=2, env={"NCCL_NVLS_ENABLE": "1"}), [0, 1])
    assert {k: env[k] for k in NVLS_OFF_ENV} == NVLS_OFF_ENV  # even over the spec's own environment
    for k in NVLS_OFF_ENV:
        monkeypatch.setenv(k, "1")
    old = parallel.get_state()
    try:
        init_distributed(EngineArgs(model="builtin:tiny", device="cpu"), 0, "cpu")
    finally:
        parallel.set_state(old)
    assert {k: os.environ[k] for k in NVLS_OFF_ENV} == NVLS_OFF_ENV


def test_a_writable_rank_part_is_not_laundered_into_a_template(ranks):
    from foundry_core.errors import FoundryError

    tmp, r0, noise, r1 = ranks
    r1.chmod(0o666)  # anyone could have replaced its kernels
    with pytest.raises(FoundryError, match="writable"):
        merge_rank_archives([r0, r1], tmp / "tpl.foundry", noise=noise)
    assert not (tmp / "tpl.foundry").exists()


def test_differing_kernel_images_are_named_by_their_kernels(ranks):
    """Ranks that load other kernel code (or the same images in another order) are variants of the template; the
    report (and a refused derivation) says which, naming the kernels, so a user can tell a rank-specialised JIT
    kernel from a load order."""
    from foundry_core.ranks import _image_difference

    tmp, r0, _, _ = ranks
    with Archive.open(r0) as a:
        m0 = a.manifest
    image = m0.images[0]
    other = msgspec.structs.replace(image, sha256="ab" * 32, kernels=["triton_poi_fused_mask_0", "k2", "k3", "k4"])
    second = msgspec.structs.replace(image, sha256="cd" * 32, kernels=["second_kernel"])
    m_other = msgspec.structs.replace(m0, images=[other, *m0.images[1:]])
    said = _image_difference(m0, m_other)
    assert "kernel images of its own: 1 [abababababab (triton_poi_fused_mask_0, k2, k3, ...)]" in said
    assert f"rank 0's not in it: 1 [{image.sha256[:12]} (" in said
    two = msgspec.structs.replace(m0, images=[image, second])
    assert _image_difference(two, msgspec.structs.replace(two, images=[second, image])) == (
        "the same 2 kernel images in another order (from index 0 on)")
    bad = tmp / "other_image.foundry"
    rewrite(r0, bad, images=[other, *m0.images[1:]])
    report = merge_rank_archives([r0, bad], tmp / "tpl.foundry")  # a variant, and the report says why
    assert re.search("kernel images of its own: 1 .*triton_poi_fused_mask_0", report.variants[1])
    with pytest.raises(NotTemplatable, match="kernel images of its own: 1 .*triton_poi_fused_mask_0"):
        merge_rank_archives({0: r0, 1: bad}, tmp / "tpl4.foundry", world_size=4)


def test_virtual_rank_processes_are_started_alike(tmp_path):
    # The stale bytes in kernel-argument padding come from each capture process's memory; processes started through
    # alike_process share one address layout and one hash seed, so two of them print the same addresses.
    import subprocess
    import sys

    from foundry_sglang.proc import alike_process

    code = ("import ctypes\n"
            "print(open('/proc/self/personality').read().strip(), hash('foundry'), hex(id(object())),"
            " hex(ctypes.addressof(ctypes.create_string_buffer(64))))\n")
    runs = []
    for _ in range(2):
        cmd, env = alike_process([sys.executable, "-c", code])
        runs.append(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.split())
    assert runs[0][1] == runs[1][1]  # one hash seed
    if not int(runs[0][0], 16) & 0x0040000:
        pytest.skip("this host does not let a process turn address-space randomisation off")
    assert runs[0] == runs[1]
