"""Module variables at SAVE (foundry_core.modglobals, save._check_module_globals) and the optional graph-pool
snapshot (save._snapshot_blocks), on CPU with the driver replaced by fakes.

The case these model: cuBLAS 13 keeps its alpha/beta constants in ``cublas::internal::deviceConstants``, a
module with no kernels; a GEMV/GEMM ``_ref`` kernel gets ``&deviceConstants[k]`` as an argument. That address is
outside the arena and is module memory, not an allocation; LOAD neither archives nor loads that module."""
from __future__ import annotations

import logging
import struct
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest

from foundry_core import modglobals, restore, save, schema
from foundry_core.archive import Archive
from foundry_core.codec import DecodedGraph
from foundry_core.cubin import GlobalVar
from foundry_core.errors import ArchiveError, FoundryError, UnsafeAddress, UnsupportedGraph
from foundry_core.options import ENV, Options
from foundry_core.recorder import ModuleGlobal

MODULE_GLOBALS = ENV["module_globals"]

CONSTANTS = ModuleGlobal("_ZN6cublas8internal15deviceConstantsE", 0x7F3A00200000, 112, 0xAB, True)
COUNTER = ModuleGlobal("counter", 0x7F3A00300000, 4, 0xCD, False)
ARENA = 0x6A0000000000


def _graph(*args: bytes) -> DecodedGraph:
    """One kernel node per argument buffer, all of function 0."""
    nodes = np.zeros(len(args), schema.NODE_DTYPE)
    payload = b""
    for i, a in enumerate(args):
        nodes[i]["kind"], nodes[i]["ref"] = schema.NODE_KERNEL, 0
        nodes[i]["payload_off"], nodes[i]["payload_len"] = len(payload), len(a)
        payload += a
    return DecodedGraph(nodes, payload, np.zeros(0, schema.ATTR_DTYPE), np.zeros(0, schema.EDGE_DTYPE), [], [])


def _words(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


GEMV_REF = _words(ARENA + 0x100, ARENA + 0x2000, 4096, CONSTANTS.address + 8, CONSTANTS.address + 16)
PLAIN = _words(ARENA + 0x100, ARENA + 0x2000, 4096)


def test_argument_words_inside_recorded_variables_are_found():
    g = _graph(PLAIN, GEMV_REF)
    refs = modglobals.argument_refs("decode_bs8", g.payload, save._kernel_and_copy_spans(g), [COUNTER, CONSTANTS])
    assert [(r.node, r.offset, r.address - r.var_address) for r in refs] == [(1, 24, 8), (1, 32, 16)]
    assert refs[0].name == CONSTANTS.name and refs[0].graph == "decode_bs8"
    assert "deviceConstants" in refs[0].describe("kernel 'gemv2T_kernel_ref'") and "+ 8" in refs[0].describe()


def test_words_at_the_end_of_a_variable_or_elsewhere_are_not_references():
    g = _graph(_words(CONSTANTS.address + CONSTANTS.size, CONSTANTS.address - 8, COUNTER.address + 3, 0, 1 << 63))
    refs = modglobals.argument_refs("g", g.payload, save._kernel_and_copy_spans(g), [CONSTANTS, COUNTER])
    assert [(r.name, r.offset) for r in refs] == [("counter", 16)]
    assert modglobals.argument_refs("g", g.payload, save._kernel_and_copy_spans(g), []) == []
    empty = ModuleGlobal("empty", CONSTANTS.address + CONSTANTS.size, 0, 0, False)  # size 0 covers nothing
    assert modglobals.argument_refs("g", g.payload, save._kernel_and_copy_spans(g), [empty]) == []


def test_changed_values_compare_live_bytes_with_the_image():
    table = GlobalVar("table", ".nv.global.init", 0, 8, struct.pack("<2f", 1, 2))
    counter = GlobalVar("counter", ".nv.global", 0, 4, bytes(4))
    unknown = GlobalVar("unknown", ".nv.global", 4, 4, bytes(4))
    live = {0x1000: struct.pack("<2f", 1, 2), 0x2000: struct.pack("<i", 7)}
    where = {(1, "table"): (0x1000, 8), (1, "counter"): (0x2000, 4)}
    changed = modglobals.changed_values({1: ("ab" * 32, {"table": table, "counter": counter, "unknown": unknown})},
                                        lambda m, n: where.get((m, n)), lambda a, n: live[a][:n])
    assert [(c.name, c.live) for c in changed] == [("counter", struct.pack("<i", 7))]
    assert "changed after its module was loaded" in changed[0].describe() and "byte 0" in changed[0].describe()


@pytest.mark.parametrize("value, expected", [("", "warn"), ("warn", "warn"), ("REFUSE", "refuse"), ("off", "off"),
                                             ("relocate", "relocate")])
def test_policy(monkeypatch, value, expected):
    monkeypatch.setenv(MODULE_GLOBALS, value)
    assert Options.from_env().module_globals == expected


def test_unknown_policy_is_refused(monkeypatch):
    monkeypatch.setenv(MODULE_GLOBALS, "bogus")
    with pytest.raises(FoundryError, match="FOUNDRY_MODULE_GLOBALS"):
        Options.from_env()


# -- SAVE ----------------------------------------------------------------------------------------------------------
def _save_args(recorded, graph=None):
    entry = save._Entry("decode_bs8", graph or _graph(PLAIN, GEMV_REF), False, None, 0.0, [])
    inputs = SimpleNamespace(images=SimpleNamespace(globals=lambda: list(recorded)), options=Options.from_env())
    functions = [schema.KernelFunction(image=0, name="gemv2T_kernel_ref")]
    return inputs, [entry], [], [], [], functions


@pytest.fixture
def no_driver(monkeypatch):
    """The graphs' modules have no variables (the driver part is replaced)."""
    monkeypatch.setattr(save, "_graph_modules", lambda handles, refs, stored: {})


def test_refuse_names_the_variable_and_the_kernel(monkeypatch, no_driver):
    monkeypatch.setenv(MODULE_GLOBALS, "refuse")
    with pytest.raises(UnsafeAddress, match=r"node 1 \(kernel 'gemv2T_kernel_ref'\).*deviceConstantsE \+ 8"):
        save._check_module_globals(*_save_args([CONSTANTS]), {})


def test_warn_saves_and_counts(monkeypatch, no_driver, caplog):
    monkeypatch.delenv(MODULE_GLOBALS, raising=False)
    stats = {}
    with caplog.at_level(logging.WARNING, "foundry_core.save"):
        save._check_module_globals(*_save_args([CONSTANTS, COUNTER]), stats)
    assert stats["module_global_refs"] == 2 and stats["module_globals_changed"] == 0
    assert stats["module_globals_recorded"] == 2
    assert sum("deviceConstants" in r.message for r in caplog.records) == 2


def test_nothing_found_is_silent(monkeypatch, no_driver, caplog):
    monkeypatch.setenv(MODULE_GLOBALS, "refuse")
    stats = {}
    save._check_module_globals(*_save_args([CONSTANTS], _graph(PLAIN)), stats)
    assert stats["module_global_refs"] == 0 and not caplog.records


def test_off_skips(monkeypatch):
    monkeypatch.setenv(MODULE_GLOBALS, "off")
    monkeypatch.setattr(save, "_graph_modules", lambda *a: pytest.fail("off must not touch the driver"))
    stats = {}
    save._check_module_globals(*_save_args([CONSTANTS]), stats)
    assert stats == {}


def test_changed_module_variable_is_refused(monkeypatch):
    monkeypatch.setenv(MODULE_GLOBALS, "refuse")
    var = GlobalVar("scale", ".nv.global.init", 0, 4, struct.pack("<f", 1.0))
    monkeypatch.setattr(save, "_graph_modules", lambda *a: {7: ("cd" * 32, {"scale": var})})
    monkeypatch.setattr(modglobals, "driver_address_of", lambda m, n: (0x5000, 4))
    monkeypatch.setattr(modglobals, "driver_read", lambda a, n: struct.pack("<f", 0.5))
    with pytest.raises(UnsupportedGraph, match="scale .* was changed after its module was loaded"):
        save._check_module_globals(*_save_args([], _graph(PLAIN)), {})


def test_a_failing_check_warns_unless_refusing(monkeypatch, caplog):
    def broken(*a):
        raise RuntimeError("no context")

    monkeypatch.setattr(save, "_graph_modules", broken)
    monkeypatch.setenv(MODULE_GLOBALS, "warn")
    with caplog.at_level(logging.WARNING, "foundry_core.save"):
        save._check_module_globals(*_save_args([CONSTANTS]), {})
    assert any("could not run" in r.message for r in caplog.records)
    monkeypatch.setenv(MODULE_GLOBALS, "refuse")
    with pytest.raises(RuntimeError):
        save._check_module_globals(*_save_args([CONSTANTS]), {})


# -- graph-pool snapshot (FOUNDRY_SNAPSHOT_GRAPH_POOL=1) ------------------------------------------------------
WARMUP, GRAPHS = (1, 1), (1, 2)
WORKSPACE, OUTPUT, UNUSED, WARM = ARENA + 0x10000000, ARENA + 0x10400000, ARENA + 0x10800000, ARENA + 0x11000000


def _fake_memory(monkeypatch):
    import torch

    def block(address, size):
        return {"address": address, "size": size, "state": "active_allocated"}

    segments = [
        {"segment_pool_id": GRAPHS, "blocks": [block(WORKSPACE, 4 << 20), block(OUTPUT, 4096),
                                               block(UNUSED, 2 << 20)]},
        {"segment_pool_id": WARMUP, "blocks": [block(WARM, 8192)]},
    ]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)

    class Window:
        def __init__(self, spec):
            self.spec = spec

        def cpu(self):
            return self

        def numpy(self):
            return np.full(self.spec.storage_bytes, 0x5A, np.uint8)

    monkeypatch.setattr(save, "tensor_at", lambda spec, device: Window(spec))


def _snapshot_inputs():
    return SimpleNamespace(warmup_pool=SimpleNamespace(id=WARMUP), graph_pool=SimpleNamespace(id=GRAPHS), device=0,
                           options=Options.from_env())


def test_graph_pool_blocks_are_snapshotted_only_when_asked(monkeypatch):
    _fake_memory(monkeypatch)
    words = np.array(sorted([WORKSPACE + 256, OUTPUT, UNUSED - 8]), np.uint64)
    outputs = np.array([OUTPUT], np.uint64)
    monkeypatch.delenv("FOUNDRY_SNAPSHOT_GRAPH_POOL", raising=False)
    assert [(a, note) for a, _, note in save._snapshot_blocks(_snapshot_inputs(), words, outputs)] == [
        (WARM, "small")]
    monkeypatch.setenv("FOUNDRY_SNAPSHOT_GRAPH_POOL", "1")
    got = save._snapshot_blocks(_snapshot_inputs(), words, outputs)
    # the workspace the arguments point into; not the output (the graph writes it), not the unreferenced block
    assert [(a, len(d), note) for a, d, note in got] == [(WORKSPACE, 4 << 20, "graph pool"), (WARM, 8192, "small")]


# -- relocate (FOUNDRY_MODULE_GLOBALS=relocate) -----------------------------------------------------------------
IMAGE_A = SimpleNamespace(sha256="aa" * 32, data=b"image A (kernels)")
IMAGE_B = SimpleNamespace(sha256="bb" * 32, data=b"image B (only data)")


def _defines(*datas):
    var = GlobalVar(CONSTANTS.name, ".nv.global.init", 0, CONSTANTS.size, bytes(CONSTANTS.size))
    return lambda data: SimpleNamespace(globals={CONSTANTS.name: var} if data in datas else {}, kernels={})


def test_relocation_plan_records_image_value_and_payload_offsets(monkeypatch, no_driver):
    monkeypatch.setenv(MODULE_GLOBALS, "relocate")
    monkeypatch.setattr(save, "_parsed", _defines(IMAGE_B.data))
    monkeypatch.setattr(modglobals, "driver_read", lambda a, n: b"\x02" * n if a == CONSTANTS.address else None)
    inputs, entries, *rest = _save_args([CONSTANTS])
    inputs.images.images = lambda: [IMAGE_A, IMAGE_B]
    inputs.images.module_images = lambda: {}
    plan = save._check_module_globals(inputs, entries, *rest, {})
    # node 1's arguments start at payload byte 24 (node 0 has 24 bytes); its words 3 and 4 point at +8 and +16
    assert plan == [(IMAGE_B.sha256, IMAGE_B.data, CONSTANTS.name, b"\x02" * 112, [(0, 48, 8), (0, 56, 16)])]


def test_relocation_needs_one_image_defining_the_variable(monkeypatch, no_driver):
    monkeypatch.setenv(MODULE_GLOBALS, "relocate")
    monkeypatch.setattr(save, "_parsed", _defines(IMAGE_A.data, IMAGE_B.data))
    monkeypatch.setattr(modglobals, "driver_read", lambda a, n: bytes(n))
    inputs, entries, *rest = _save_args([CONSTANTS])
    inputs.images.images = lambda: [IMAGE_A, IMAGE_B]
    inputs.images.module_images = lambda: {}
    with pytest.raises(UnsupportedGraph, match="defined in 2 recorded images"):
        save._check_module_globals(inputs, entries, *rest, {})
    # the module handle the variable was asked of decides when the recorder paired it with its image
    paired = ModuleGlobal(CONSTANTS.name, CONSTANTS.address, CONSTANTS.size, 0xAB, False)
    assert modglobals.image_of_variable(paired, [IMAGE_A, IMAGE_B], {0xAB: 0}, _defines(IMAGE_A.data, IMAGE_B.data)) \
        == (IMAGE_A.sha256, IMAGE_A.data)


def test_apply_variables_relocates_words_and_writes_values():
    payload = np.zeros(48, np.uint8)
    arrays = {0: ("nodes", payload, "attrs", "edges"), 1: ("n1", np.zeros(8, np.uint8), "a1", "e1")}
    var = schema.ModuleVariable(image=1, name="c", size=112, value="blob", refs=[(0, 16, 8), (0, 24, 16)])
    writes = []
    out = modglobals.apply_variables([var], arrays, [0x10, 0x20],
                                     lambda m, n: (0x7000, 112) if (m, n) == (0x20, "c") else None,
                                     lambda a, d: writes.append((a, d)), lambda b: b"\1" * 112)
    words = np.frombuffer(out[0][1].tobytes(), "<u8")
    assert words.tolist() == [0, 0, 0x7008, 0x7010, 0, 0]
    assert not payload.any() and out[1] is arrays[1]  # the archive's arrays are left alone
    assert writes == [(0x7000, b"\1" * 112)]
    with pytest.raises(FoundryError, match="not found in the freshly loaded module"):
        modglobals.apply_variables([var], arrays, [0x10, 0x20], lambda m, n: None, lambda a, d: None, lambda b: b"")
    with pytest.raises(FoundryError, match="56 bytes in the freshly loaded module"):
        modglobals.apply_variables([var], arrays, [0x10, 0x20], lambda m, n: (0x7000, 56), lambda a, d: None,
                                   lambda b: b"")


def test_module_variables_round_trip_and_are_checked(archive_file):
    from conftest import rewrite_manifest

    path, _ = archive_file
    with Archive.open(path) as a:
        m = a.manifest
        nodes = a.blob_array(m.graphs[0].nodes, schema.NODE_DTYPE)
    k = int(np.nonzero((nodes["kind"] == schema.NODE_KERNEL) & (nodes["payload_len"] >= 16))[0][0])
    off = int(nodes[k]["payload_off"])
    var = schema.ModuleVariable(image=1, name="cublas_constants", size=3000, value="snapshots/0", refs=[(0, off, 8)])
    rewrite_manifest(path, msgspec.structs.replace(m, module_variables=[var]))
    with Archive.open(path) as a:
        assert a.manifest.module_variables == [var]
        restore.check_archive_for_load(a)
    for bad, message in [
        (msgspec.structs.replace(var, image=5), "refers to image 5"),
        (msgspec.structs.replace(var, refs=[(9, off, 0)]), "refers to graph 9"),
        (msgspec.structs.replace(var, refs=[(0, off + 4, 0)]), "not an aligned word"),
        (msgspec.structs.replace(var, refs=[(0, off, 3000)]), "not an aligned word"),
        (msgspec.structs.replace(var, value=m.graphs[0].nodes), "value blob holds"),
        (msgspec.structs.replace(var, refs=[(0, 1 << 40, 0)]), "outside every kernel's arguments"),
    ]:
        rewrite_manifest(path, msgspec.structs.replace(m, module_variables=[bad]))
        with pytest.raises(ArchiveError, match=message):
            with Archive.open(path) as a:
                restore.check_archive_for_load(a)
