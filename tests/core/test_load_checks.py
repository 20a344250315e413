"""LOAD checks every index, offset, size and address of a tampered archive before native code or the GPU sees it,
and every failure of the background builder reaches ``replay()`` as a FoundryError (CPU)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from fuzz_archives import (
    ARENA_BASE,
    CAPTURE,
    CAPTURE_END,
    memcpy3d_record,
    memset_record,
    tamper,
    write_realistic_archive,
)

from foundry_core import schema
from foundry_core.archive import Archive
from foundry_core.errors import ArchiveError, FoundryError
from foundry_core.options import Options
from foundry_core.restore import GraphBuilder, RestoredGraph, RestoreStats, build_all, graph_tables


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    path = tmp_path_factory.mktemp("load") / "valid.foundry"
    write_realistic_archive(path)
    return path


def _nodes(path, graph=0):
    with Archive.open(path) as archive:
        rec = archive.manifest.graphs[graph]
        return rec, archive.blob_array(rec.nodes, schema.NODE_DTYPE).copy(), archive.blob(rec.payload)


def _with_nodes(realistic, tmp_path, change, graph=0, payload=None):
    rec, nodes, old_payload = _nodes(realistic, graph)
    change(nodes)
    blobs = {rec.nodes: nodes.tobytes()}
    if payload is not None:
        blobs[rec.payload] = payload(bytearray(old_payload))
    return tamper(realistic, tmp_path / "tampered.foundry", blobs=blobs)


def _tables(path, graph=0, options=None):
    with Archive.open(path, options) as archive:
        return graph_tables(archive, archive.manifest, graph)


def _kind_index(nodes, kind):
    return int(np.nonzero(nodes["kind"] == kind)[0][0])


def test_the_realistic_archive_passes_every_check(realistic):
    from foundry_core.restore import check_archive_for_load

    with Archive.open(realistic) as archive:
        tables = check_archive_for_load(archive)
    assert sorted(tables) == [0, 1, 2]


# -- item 8: node tables ------------------------------------------------------------------------------------------


def test_payload_offset_that_wraps_around_is_refused(realistic, tmp_path):
    def change(nodes):
        i = _kind_index(nodes, schema.NODE_KERNEL)
        nodes[i]["payload_off"] = 2**64 - 8  # + payload_len wraps to a small number in uint64
    with pytest.raises(ArchiveError, match="node 1 .*payload"):
        _tables(_with_nodes(realistic, tmp_path, change))


def test_kernel_index_out_of_range_is_refused(realistic, tmp_path):
    def change(nodes):
        nodes[_kind_index(nodes, schema.NODE_KERNEL)]["ref"] = 10**9
    with pytest.raises(ArchiveError, match="kernel 1000000000 of 3"):
        _tables(_with_nodes(realistic, tmp_path, change))


def test_event_node_without_events_is_refused(realistic, tmp_path):
    path = tamper(realistic, tmp_path / "t.foundry", edit=lambda doc, blobs: doc.update(num_events=0))
    with pytest.raises(ArchiveError, match="event 0 of 0"):
        _tables(path)


def test_memset_payload_must_be_a_whole_record(realistic, tmp_path):
    def change(nodes):
        nodes[_kind_index(nodes, schema.NODE_MEMSET)]["payload_len"] = 8
    with pytest.raises(ArchiveError, match="memset .*8 bytes.* 40"):
        _tables(_with_nodes(realistic, tmp_path, change))


@pytest.mark.parametrize("ref", [0, 7], ids=["refers to itself: not a recursion", "out of range: not an IndexError"])
def test_bad_child_graph_reference_is_refused(realistic, ref):
    with Archive.open(realistic) as archive:
        m = archive.manifest
        arrays = {i: graph_tables(archive, m, i) for i in range(len(m.graphs))}
        nodes = arrays[0][0].copy()
        nodes["ref"][nodes["kind"] == schema.NODE_CHILD_GRAPH] = ref
        arrays[0] = (nodes,) + arrays[0][1:]
        builder = GraphBuilder(archive, m, None, np.zeros(3, np.uint64), np.zeros(1, np.uint64))
        builder.arrays = arrays
        with pytest.raises(ArchiveError, match="child graph"):
            builder.build(0)


def test_child_graph_cycle_is_found_before_building(realistic, tmp_path):
    from foundry_core.restore import check_archive_for_load

    rec, nodes, _ = _nodes(realistic, 2)  # the child graph gets a child node that points back at a parent
    nodes[1]["kind"], nodes[1]["ref"], nodes[1]["attr_cnt"] = schema.NODE_CHILD_GRAPH, 0, 0
    nodes[1]["payload_off"] = nodes[1]["payload_len"] = 0
    path = tamper(realistic, tmp_path / "cycle.foundry", blobs={rec.nodes: nodes.tobytes()})
    with Archive.open(path) as archive, pytest.raises(ArchiveError, match="child graph"):
        check_archive_for_load(archive)


def test_edges_must_point_forward_inside_the_graph(realistic, tmp_path):
    with Archive.open(realistic) as archive:
        tpl = archive.manifest.templates[0]
        edges = archive.blob_array(tpl.edges, schema.EDGE_DTYPE).copy()
    edges[0]["src"], edges[0]["dst"] = 3, 1
    path = tamper(realistic, tmp_path / "edge.foundry", blobs={tpl.edges: edges.tobytes()})
    with pytest.raises(ArchiveError, match="edge 0"):
        _tables(path)


class _Stream:
    def synchronize(self):
        pass


@pytest.mark.parametrize("failure", [IndexError("index 7 is out of bounds"), RecursionError("maximum recursion"),
                                     MemoryError()])
def test_every_background_failure_reaches_replay_as_a_foundry_error(monkeypatch, failure):
    """Before: only FoundryError was caught, so the thread died and later graphs' replay() waited forever."""
    import torch

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # the builder below never touches CUDA

    class Builder:
        def build(self, index):
            if index == 1:
                raise failure
            raise ArchiveError("graph 2 is broken")

    graphs = {i: RestoredGraph(f"g{i}", None, lib=None) for i in (1, 2)}
    thread = threading.Thread(target=build_all, args=(Builder(), [1, 2], graphs, RestoreStats(), 0.0, 0, _Stream()))
    thread.start()
    thread.join(10)
    for rg in graphs.values():
        with pytest.raises(FoundryError, match=f"graph '{rg.key}' could not be restored"):
            rg.wait(timeout=5)
        with pytest.raises(FoundryError):
            rg.replay()


def test_a_background_thread_that_cannot_start_fails_every_graph(monkeypatch):
    import torch

    def no_device(device):
        raise RuntimeError("no CUDA GPUs are available")
    monkeypatch.setattr(torch.cuda, "set_device", no_device)
    graphs = {i: RestoredGraph(f"g{i}", None, lib=None) for i in (1, 2)}
    thread = threading.Thread(target=build_all, args=(object(), [1, 2], graphs, RestoreStats(), 0.0, 0, _Stream()))
    thread.start()
    thread.join(10)
    for rg in graphs.values():
        with pytest.raises(FoundryError, match="no CUDA GPUs"):
            rg.wait(timeout=5)


# -- item 11: LOAD re-checks what SAVE checked --------------------------------------------------------------------


def test_snapshot_outside_the_capture_region_is_refused(realistic, tmp_path):
    def edit(doc, blobs):
        doc["snapshots"][0]["address"] = ARENA_BASE + 0x1000  # application memory (weights), not a warm-up buffer
    with pytest.raises(ArchiveError, match="snapshot at .*outside the capture region"):
        Archive.open(tamper(realistic, tmp_path / "t.foundry", edit=edit))


def test_snapshot_size_must_match_its_blob(realistic, tmp_path):
    def edit(doc, blobs):
        doc["snapshots"][1]["size"] = 1000  # still inside the capture region: LOAD would copy 64 bytes into 1000
    with pytest.raises(ArchiveError, match="snapshot at .*records 1000 bytes but its blob holds 64"):
        Archive.open(tamper(realistic, tmp_path / "t.foundry", edit=edit))


def test_output_outside_the_arena_is_refused(realistic, tmp_path):
    def edit(doc, blobs):
        doc["graphs"][1]["outputs"][0]["address"] = 0x7F00_0000_0000
    with pytest.raises(ArchiveError, match="output 0 .*outside the restored arena"):
        Archive.open(tamper(realistic, tmp_path / "t.foundry", edit=edit))


@pytest.mark.parametrize("dtype", ["load", "__class__", "not_a_dtype"])
def test_output_dtype_must_be_a_torch_dtype_name(realistic, tmp_path, dtype):
    def edit(doc, blobs):
        doc["graphs"][0]["outputs"][0]["dtype"] = dtype
    with pytest.raises(ArchiveError, match="dtype"):
        Archive.open(tamper(realistic, tmp_path / "t.foundry", edit=edit))


def test_output_view_larger_than_its_storage_is_refused(realistic, tmp_path):
    def edit(doc, blobs):
        doc["graphs"][0]["outputs"][0]["shape"] = [1 << 20, 16]
    with pytest.raises(ArchiveError, match="output 0"):
        Archive.open(tamper(realistic, tmp_path / "t.foundry", edit=edit))


def test_memcpy_to_host_memory_is_refused_at_load(realistic, tmp_path):
    rec, nodes, payload = _nodes(realistic)
    i = _kind_index(nodes, schema.NODE_MEMCPY)
    off = int(nodes[i]["payload_off"])
    host = memcpy3d_record(CAPTURE + 0x20000, 0x7F00_0000_0000, 512, dst_type=1)
    path = tamper(realistic, tmp_path / "t.foundry",
                  blobs={rec.payload: payload[:off] + host + payload[off + len(host):]})
    with pytest.raises(ArchiveError, match=r"memcpy\): .*device-to-device"):
        _tables(path)


def test_memcpy_outside_the_arena_is_refused_at_load(realistic, tmp_path):
    rec, nodes, payload = _nodes(realistic)
    off = int(nodes[_kind_index(nodes, schema.NODE_MEMCPY)]["payload_off"])
    outside = memcpy3d_record(CAPTURE + 0x20000, ARENA_BASE + CAPTURE_END - 256, 512)
    path = tamper(realistic, tmp_path / "t.foundry",
                  blobs={rec.payload: payload[:off] + outside + payload[off + len(outside):]})
    with pytest.raises(ArchiveError, match=r"memcpy\): destination .*outside"):
        _tables(path)


def test_memset_outside_the_arena_is_refused_at_load(realistic, tmp_path):
    rec, nodes, payload = _nodes(realistic)
    off = int(nodes[_kind_index(nodes, schema.NODE_MEMSET)]["payload_off"])
    outside = memset_record(ARENA_BASE - 4096, width=1024)
    path = tamper(realistic, tmp_path / "t.foundry",
                  blobs={rec.payload: payload[:off] + outside + payload[off + len(outside):]})
    with pytest.raises(ArchiveError, match=r"memset\): target .*outside"):
        _tables(path)


def test_unknown_launch_attribute_is_refused(realistic, tmp_path):
    with Archive.open(realistic) as archive:
        rec = archive.manifest.graphs[0]
        attrs = archive.blob_array(rec.attrs, schema.ATTR_DTYPE).copy()
    attrs[0]["id"] = 99
    path = tamper(realistic, tmp_path / "t.foundry", blobs={rec.attrs: attrs.tobytes()})
    with pytest.raises(ArchiveError, match="launch attribute 99"):
        _tables(path)


# -- the native builder checks the same bounds itself -------------------------------------------------------------


@pytest.fixture(scope="module")
def lib():
    from foundry_core.native import native_lib

    return native_lib()


def _native(lib, path, graph=0, n_events=1):
    from foundry_core.restore import NativeTables, native_check

    with Archive.open(path) as archive:
        m = archive.manifest
        rec = m.graphs[graph]
        nodes = archive.blob_array(rec.nodes, schema.NODE_DTYPE)
        payload = archive.blob_array(rec.payload, np.uint8)
        attrs = archive.blob_array(rec.attrs, schema.ATTR_DTYPE)
        edges = archive.blob_array(m.templates[rec.template].edges, schema.EDGE_DTYPE)
        children = np.zeros(len(m.graphs), np.uint64)  # child refs unmapped: they index the archive's graphs
        return native_check(lib, NativeTables(nodes, payload, attrs, edges, np.zeros(3, np.uint64),
                                              np.zeros(n_events, np.uint64), children))


def test_native_check_accepts_the_valid_tables(lib, realistic):
    assert _native(lib, realistic) is None


@pytest.mark.parametrize("field,value,message", [
    ("payload_off", 2**64 - 8, "payload"),
    ("ref", 10**9, "kernel"),
    ("attr_off", 2**32 - 1, "attribute"),
])
def test_native_check_refuses_what_python_refuses(lib, realistic, tmp_path, field, value, message):
    def change(nodes):
        nodes[_kind_index(nodes, schema.NODE_KERNEL)][field] = value
    assert message in _native(lib, _with_nodes(realistic, tmp_path, change))


def test_native_check_refuses_event_nodes_without_events(lib, realistic):
    assert "event" in _native(lib, realistic, n_events=0)


def test_native_check_refuses_a_short_memset(lib, realistic, tmp_path):
    def change(nodes):
        nodes[_kind_index(nodes, schema.NODE_MEMSET)]["payload_len"] = 8
    assert "memset" in _native(lib, _with_nodes(realistic, tmp_path, change))


def test_too_many_events_for_the_nodes_is_refused(realistic, tmp_path):
    """Before: LOAD created num_events CUDA events, however many the manifest claimed."""
    path = tamper(realistic, tmp_path / "t.foundry", edit=lambda doc, blobs: doc.update(num_events=10**6))
    with pytest.raises(ArchiveError, match="events for"):
        Archive.open(path)


def test_foreign_memset_targets_follow_the_save_switch(realistic, tmp_path):
    rec, nodes, payload = _nodes(realistic)
    off = int(nodes[_kind_index(nodes, schema.NODE_MEMSET)]["payload_off"])
    outside = memset_record(0x7F00_0000_0000, width=1024)  # e.g. a buffer SAVE was told to allow
    path = tamper(realistic, tmp_path / "t.foundry",
                  blobs={rec.payload: payload[:off] + outside + payload[off + len(outside):]})
    with pytest.raises(ArchiveError, match="outside"):
        _tables(path)
    _tables(path, options=Options(allow_foreign_pointers=True))


def test_slot_node_must_be_described_and_its_buffers_inside_the_arena(realistic, tmp_path):
    def change(nodes):
        nodes[_kind_index(nodes, schema.NODE_SLOT)]["ref"] = 99
    with pytest.raises(ArchiveError, match="slot 99, which the manifest does not describe"):
        _tables(_with_nodes(realistic, tmp_path, change))

    def edit(doc, blobs):
        doc["slots"][0]["recv"] = 0x7F00_0000_0000
    with pytest.raises(ArchiveError, match="slot 8 .*recv buffer .*outside"):
        Archive.open(tamper(realistic, tmp_path / "slot.foundry", edit=edit))


def test_output_constants_must_fit_the_output_structure(realistic, tmp_path):
    """A constant leaf outside the structure made save.unflatten_outputs run out of tensors (StopIteration inside
    restore()); the preloader now refuses the archive first."""
    from foundry_core.restore import check_archive_for_load

    def edit(doc, blobs):
        doc["graphs"][0]["output_constants"] = {7: None}
    path = tamper(realistic, tmp_path / "constants.foundry", edit=edit)
    with Archive.open(path) as archive, pytest.raises(ArchiveError, match="2 tensors and 1 constants"):
        check_archive_for_load(archive)


# -- rank templates -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [dict(graph=3), dict(snapshot=2), dict(), dict(graph=0, snapshot=0)])
def test_a_rank_patch_for_nothing_that_exists_is_refused(realistic, tmp_path, target):
    """Before: a patch for a graph or snapshot the archive does not have was silently ignored."""
    def edit(doc, blobs):
        doc["ranks"]["deltas"][0]["patches"].append(dict(dict(graph=-1, snapshot=-1), offset=0, data=b"\1",
                                                         **target))
    path = tamper(realistic, tmp_path / "tampered.foundry", edit=edit)
    with pytest.raises(ArchiveError, match="rank 1 patch at 0 is for graph"):
        Archive.open(path)


@pytest.mark.parametrize("ranks", [[1, 1], [2], [0]])
def test_rank_deltas_must_be_for_distinct_ranks_of_the_template(realistic, tmp_path, ranks):
    def edit(doc, blobs):
        delta = doc["ranks"]["deltas"][0]
        doc["ranks"]["deltas"] = [dict(delta, rank=r) for r in ranks]
    with pytest.raises(ArchiveError, match="rank template deltas and variants for ranks"):
        Archive.open(tamper(realistic, tmp_path / "tampered.foundry", edit=edit))
