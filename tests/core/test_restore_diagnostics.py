"""What a LOAD writes back besides the graphs, read from the manifest (``save.snapshot_facts``), and the one-line
phase summary ``restore_archive`` logs (``RestoreStats.summary``): the diagnostics of a slow restore() (CPU)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import msgspec
from conftest import ARENA_BASE, sample_archive

from foundry_core import schema
from foundry_core.archive import Archive
from foundry_core.restore import RestoreStats
from foundry_core.save import snapshot_facts

GPU_DIR = Path(__file__).resolve().parents[1] / "gpu"


def _manifest(tmp_path):
    path = tmp_path / "m.foundry"
    sample_archive(path)
    with Archive.open(path) as a:
        return a.manifest, path


def _with_output_in_snapshot(m: schema.Manifest, offset: int, storage: int) -> schema.Manifest:
    snap = m.snapshots[0]
    spec = schema.TensorSpec(address=snap.address + offset, dtype="uint8", shape=[storage], strides=[1],
                             storage_bytes=storage)
    graphs = [msgspec.structs.replace(m.graphs[0], outputs=[spec])] + list(m.graphs[1:])
    return msgspec.structs.replace(m, graphs=graphs)


def test_sample_archive_writes_back_one_small_snapshot_and_no_output(tmp_path):
    m, _ = _manifest(tmp_path)
    f = snapshot_facts(m)
    assert f["snapshots"] == 1 and f["snapshot_bytes"] == 3000 and f["snapshot_bytes_by_note"] == {"rope": 3000}
    assert f["snapshot_stored_bytes"] == 3000  # random bytes stay raw
    assert f["capture_region_bytes"] == 6 << 20
    assert f["outputs"] == 3 and f["outputs_in_snapshots"] == 0 and f["output_bytes_in_snapshots"] == 0


def test_a_graph_output_inside_a_warm_up_snapshot_is_counted(tmp_path):
    m, _ = _manifest(tmp_path)
    for offset, storage, inside in ((0, 3000, True), (1000, 2000, True), (1000, 2001, False), (2999, 1, True)):
        f = snapshot_facts(_with_output_in_snapshot(m, offset, storage))
        assert f["outputs_in_snapshots"] == int(inside), (offset, storage)
        assert f["output_bytes_in_snapshots"] == (storage if inside else 0)


def test_output_before_every_snapshot_and_manifest_without_blob_table(tmp_path):
    m, _ = _manifest(tmp_path)
    spec = schema.TensorSpec(address=ARENA_BASE, dtype="uint8", shape=[8], strides=[1], storage_bytes=8)
    m2 = msgspec.structs.replace(m, graphs=[msgspec.structs.replace(m.graphs[0], outputs=[spec])], blobs={})
    f = snapshot_facts(m2)
    assert f["outputs_in_snapshots"] == 0
    assert f["snapshot_stored_bytes"] == -1  # unknown before the writer filled the blob table


def test_restore_summary_names_every_phase():
    st = RestoreStats(layout_seconds=0.001, blocks_seconds=0.002, map_seconds=0.003, snapshot_seconds=6.5,
                      preload_wait_seconds=0.2, decode_seconds=0.01, images_seconds=0.3, first_graph_seconds=6.9,
                      returned_seconds=7.0, num_snapshots=40, snapshot_bytes=2580 << 20,
                      snapshot_stored_bytes=11 << 20, capture_region_bytes=3 << 30)
    st.per_graph["decode_bs1"] = 0.01
    line = st.summary()
    for word in ("layout", "blocks", "map", "snapshots 6.500s (40, 2580.0 MiB from 11.0 MiB stored)",
                 "3072 MiB capture region", "preloader wait 0.200s", "images 0.300s", "first graph 6.900s",
                 "returned after 7.000s"):
        assert word in line, word
    phases = st.phases()
    assert "per_graph" not in phases and phases["snapshot_bytes"] == 2580 << 20
    assert set(phases) == set(vars(st)) - {"per_graph"}


def test_check_comm_patch_describes_what_load_writes_back(tmp_path, monkeypatch):
    """The GPU script's archive row is computed from the manifest alone, so it runs here."""
    monkeypatch.syspath_prepend(str(GPU_DIR.parents[1]))
    spec = importlib.util.spec_from_file_location("gpu_check_comm_patch", GPU_DIR / "check_comm_patch.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check_comm_patch", module)
    spec.loader.exec_module(module)
    _, path = _manifest(tmp_path)
    facts = module.archive_facts(path)
    assert facts["archive_bytes"] == path.stat().st_size
    text = module.describe_facts(facts)
    assert "1 snapshots" in text and "rope" in text and "graph outputs inside snapshots: 0/3" in text
