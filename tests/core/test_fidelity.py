"""CPU tests of fidelity: the arena allocation trace (encode, compare, first-divergence messages), the pointer-check
rules, RNG state and address checks in the schema, and the replay-time RNG bookkeeping."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from conftest import FINGERPRINT

from foundry_core import layout, safety, schema
from foundry_core.archive import Archive, ArchiveWriter
from foundry_core.errors import ArchiveError, LayoutMismatch
from foundry_core.restore import rng_prologue

GRAN = 2 << 20
BASE = 0x6A0000000000
MiB = 1 << 20


def trace(*segments) -> np.ndarray:
    """Rows for (op, pool, MiB) segments laid out as the forward-only arena cursor would place them."""
    rows = np.zeros(len(segments), layout.TRACE_DTYPE)
    cursor, where = 0, {}
    for i, (op, pool, mib) in enumerate(segments):
        size = mib * MiB
        if op == layout.OP_ALLOC:
            where.setdefault((pool, mib), []).append(cursor)
            rows[i] = (op, pool, 0, size // GRAN, cursor)
            cursor += size
        else:
            rows[i] = (op, pool, 0, size // GRAN, where[(pool, mib)].pop(0))
    return rows


A, F = layout.OP_ALLOC, layout.OP_FREE
SAVE_ORDER = [(A, 0, 20), (A, 0, 16), (A, 0, 16), (A, 0, 16), (A, 0, 40)]  # buffer, 3 weights, KV cache
LABELS = [("buffer", 0, 1), ("weights", 1, 4), ("kv cache", 4, 5)]


def saved(rows=None, compared=None, held=None):
    rows = trace(*SAVE_ORDER) if rows is None else rows
    enc = layout.encode(rows, len(rows) if compared is None else compared, LABELS, held)
    return enc, layout.decode(enc)


# -- encode / decode ------------------------------------------------------------------------------------------
def test_trace_rows_mirror_the_native_record():
    assert layout.TRACE_DTYPE.itemsize == 16
    assert [layout.TRACE_DTYPE.fields[n][1] for n in ("op", "pool", "granules", "offset")] == [0, 1, 4, 8]


def test_encode_decode_round_trip_and_compactness():
    rows = trace(*([(A, 0, 2)] * 5000 + [(F, 0, 2)] * 5000))
    enc = layout.encode(rows, 6000, LABELS, {3: "1 tensor(s): 2.0 MiB"})
    assert enc.count == 10000 and enc.compared == 6000 and len(enc.sha256) == 64
    assert len(enc.records) < rows.nbytes // 4  # forward-only offsets compress well
    back = layout.decode(enc)
    assert back.tobytes() == rows.tobytes()
    assert [(lb.name, lb.first, lb.end) for lb in enc.labels] == LABELS
    with pytest.raises(ValueError):
        layout.encode(rows, 10001)


def test_decode_refuses_damaged_traces():
    enc, _ = saved()
    raw = bytearray(zlib.decompress(enc.records))
    raw[17] ^= 1  # second row's pool
    tampered = schema.AllocationTrace(records=zlib.compress(bytes(raw)), count=enc.count,
                                      compared=enc.compared, sha256=enc.sha256)
    with pytest.raises(ArchiveError, match="sha256"):
        layout.decode(tampered)
    for bad in (schema.AllocationTrace(records=enc.records, count=enc.count + 1, compared=1, sha256=enc.sha256),
                schema.AllocationTrace(records=b"not zlib", count=1, compared=1, sha256=enc.sha256)):
        with pytest.raises(ArchiveError, match="corrupt"):
            layout.decode(bad)


# -- comparison -----------------------------------------------------------------------------------------------
def test_first_divergence():
    rows = trace(*SAVE_ORDER)
    assert layout.first_divergence(rows, rows.copy()) is None
    other = rows.copy()
    other[3]["granules"] += 1
    assert layout.first_divergence(rows, other) == 3
    assert layout.first_divergence(rows, rows[:2]) == 2
    assert layout.first_divergence(rows[:2], rows) == 2
    freed = rows.copy()
    freed[4]["op"] = F  # same sizes and offsets, a free instead of an allocation
    assert layout.first_divergence(rows, freed) == 4


def test_same_trace_passes():
    enc, dec = saved()
    layout.check(enc, dec, trace(*SAVE_ORDER), GRAN)


def test_reorder_after_weights_names_the_divergent_allocation():
    """The issue's case: one buffer after the weights instead of before (same total, so a cursor check passes)."""
    enc, dec = saved(held={0: "1 tensor(s): 2.0 MiB"})
    live = trace((A, 0, 16), (A, 0, 16), (A, 0, 16), (A, 0, 20), (A, 0, 40))
    assert int(live["offset"][-1]) == int(dec["offset"][-1])  # the later KV cache even lands at the same offset
    with pytest.raises(LayoutMismatch) as err:
        layout.check(enc, dec, live, GRAN)
    msg = str(err.value)
    assert "at allocation #0 of 5" in msg
    assert 'SAVE made a 20.0 MiB init-pool allocation at arena+0x0 ("buffer"; held 1 tensor(s): 2.0 MiB)' in msg
    assert "this process made a 16.0 MiB init-pool allocation at arena+0x0" in msg
    assert "same model, flags, library versions and plugins" in msg and "\n" not in msg


def test_one_gib_shift_is_refused():
    enc, dec = saved()
    live = trace((A, 0, 1024), *SAVE_ORDER)
    with pytest.raises(LayoutMismatch, match=r"#0 of 5: SAVE made a 20\.0 MiB .* this process made a 1\.0 GiB"):
        layout.check(enc, dec, live, GRAN)


def test_missing_allocation_names_what_the_graphs_would_read():
    """A KV pool created after restore() in LOAD (before capture in SAVE) is covered: refused, named."""
    enc, dec = saved()
    with pytest.raises(LayoutMismatch) as err:
        layout.check(enc, dec, trace(*SAVE_ORDER[:4]), GRAN)
    msg = str(err.value)
    assert "made only 4 of SAVE's 5" in msg and "missing #4" in msg and '40.0 MiB init-pool allocation' in msg
    assert '"kv cache"' in msg and "call restore() only after everything the graphs read exists" in msg


def test_extra_allocation_and_extra_free_are_refused():
    enc, dec = saved()
    with pytest.raises(LayoutMismatch, match=r"made 6 allocations/frees before restore\(\), SAVE made 5; the first "
                                             r"extra one is #5, a 2\.0 MiB warm-up-pool allocation"):
        layout.check(enc, dec, trace(*SAVE_ORDER, (A, 1, 2)), GRAN)
    with pytest.raises(LayoutMismatch, match="extra one is #5, a 16.0 MiB init-pool free"):
        layout.check(enc, dec, trace(*SAVE_ORDER, (F, 0, 16)), GRAN)


def test_only_the_part_before_capture_is_compared():
    rows = trace(*SAVE_ORDER, (A, 1, 2), (A, 2, 64), (F, 1, 2))
    enc, dec = saved(rows, compared=5)
    layout.check(enc, dec, trace(*SAVE_ORDER), GRAN)
    with pytest.raises(LayoutMismatch):
        layout.check(enc, dec, rows, GRAN)  # LOAD must not have made the capture phase's allocations itself


def test_blocks_the_graphs_read():
    blocks = np.array([[0, 2 * MiB], [2 * MiB, 8 * MiB], [10 * MiB, 8 * MiB], [20 * MiB, 512]], "<u8")
    words = np.array([BASE + MiB, BASE + 12 * MiB, BASE + 30 * MiB], "<u8")  # the last one is in no block
    assert layout.read_blocks(blocks, words, BASE).tolist() == [[0, 2 * MiB], [10 * MiB, 8 * MiB]]
    assert layout.read_blocks(blocks, words[:0], BASE).shape == (0, 2)


def test_reorder_inside_one_segment_is_caught_by_the_blocks_graphs_read():
    """Small tensors share segments: same segment rows, but the buffer now sits after the weights."""
    rows = trace((A, 0, 20), (A, 0, 2))
    read = np.array([[0, 2 * MiB], [2 * MiB, 8 * MiB], [20 * MiB, 512]], "<u8")  # buffer, weight, small
    enc = layout.encode(rows, 2, [("buffer", 0, 1)], blocks=read)
    got = layout.decode_blocks(enc)
    assert got.tobytes() == read.tobytes() and enc.num_blocks == 3
    layout.check(enc, layout.decode(enc), rows, GRAN)  # the segment rows alone cannot see it
    garbage = np.array([[18 * MiB, 64]], "<u8")  # live blocks no graph reads do not matter
    layout.check_blocks(enc, got, np.vstack([read, garbage]), rows)
    live = np.array([[0, 8 * MiB], [8 * MiB, 8 * MiB], [16 * MiB, 2 * MiB], [20 * MiB, 512]], "<u8")
    with pytest.raises(LayoutMismatch) as err:
        layout.check_blocks(enc, got, live, rows)
    msg = str(err.value)
    assert 'the graphs read a 2.0 MiB tensor at arena+0x0 in segment #0 ("buffer") (2 of 3 such tensors differ)' in msg
    assert "this process holds a 8.0 MiB block at arena+0x0 there" in msg
    with pytest.raises(LayoutMismatch, match=r"512 B tensor at arena\+0x1400000 in segment #1 .* holds no tensor"):
        layout.check_blocks(enc, got, read[:2], rows)


def test_damaged_block_table_is_refused():
    enc = layout.encode(trace((A, 0, 20)), 1, blocks=np.array([[0, 64]], "<u8"))
    bad = schema.AllocationTrace(**{**{f: getattr(enc, f) for f in enc.__struct_fields__}, "num_blocks": 2})
    with pytest.raises(ArchiveError, match="block table"):
        layout.decode_blocks(bad)


def test_archive_without_trace_cannot_be_verified():
    with pytest.raises(LayoutMismatch, match="no allocation trace"):
        layout.check(None, None, trace(*SAVE_ORDER), GRAN)


# -- pointer-check rules ------------------------------------------------------------------------------------------
FOREIGN = 0x7F00_0040_0000
TI_KERNEL = "_Z21indexSelectSmallIndexIfjLi2ELi2ELin2ELb1EEvN2at4cuda6detail10TensorInfoIT_T0_EES6_NS3_IlS5_EEiiS5_l"
OC_KERNEL = "_ZN2at6native18elementwise_kernelILi128ELi4EZNS0_22gpu_kernel_impl_nocastI16OffsetCalculatorEEvv"


def tensor_info(dims: int, index_bytes: int = 4, data: int = 0x6A00_0000_1000, fill: dict | None = None) -> bytes:
    """A TensorInfo<T, I> argument: data, sizes[25], strides[25], dims (+ tail padding)."""
    size = 216 if index_bytes == 4 else 416
    buf = bytearray(size)
    buf[0:8] = data.to_bytes(8, "little")
    buf[8 + 50 * index_bytes: 12 + 50 * index_bytes] = dims.to_bytes(4, "little")
    for off, word in (fill or {}).items():
        buf[off:off + 8] = word.to_bytes(8, "little")
    return bytes(buf)


def test_whole_word_params_from_the_parameter_layout():
    assert safety.whole_word_params([(0, 8), (8, 4), (16, 56), (72, 8)]) == {0, 72}


def test_tensor_info_padding_is_the_slots_beyond_dims():
    args = tensor_info(dims=2)
    assert safety.padding_ranges(TI_KERNEL, [(0, 216)], args) == [(16, 108), (116, 208), (212, 216)]
    wide = tensor_info(dims=3, index_bytes=8)
    assert safety.padding_ranges(TI_KERNEL, [(0, 416)], wide) == [(32, 208), (232, 408), (412, 416)]
    assert safety.padding_ranges("nvjet_sm90_tst_128x64", [(0, 216)], args) == []  # not a PyTorch struct
    assert safety.padding_ranges(TI_KERNEL, [(0, 216)], tensor_info(dims=0)) == []  # implausible dims: no padding
    assert safety.padding_ranges(TI_KERNEL, [(0, 200)], args) == []  # another size: another struct


def test_offset_calculator_padding():
    args = bytearray(8 + 404)  # (int64 n) + OffsetCalculator<1, uint32_t> with dims 3
    args[8:12] = (3).to_bytes(4, "little")
    got = safety.padding_ranges(OC_KERNEL, [(0, 8), (8, 404)], bytes(args))
    assert got == [(8 + 4 + 3 * 12, 8 + 304), (8 + 304 + 3 * 4, 8 + 404)]


@pytest.mark.parametrize("is_kernel, offset, rule", [
    (True, 0, safety.WHOLE_PARAMETER),  # a pointer parameter: used
    (True, 24, safety.PADDING),  # an unused TensorInfo slot: stale
    (True, 104, safety.IN_AGGREGATE),  # straddles used and unused slots: treated as used
    (True, 256, safety.IN_AGGREGATE),  # inside another struct (e.g. a cuBLASLt blob): used
    (False, 0, safety.NODE_ADDRESS),  # memset/memcpy addresses are always used
])
def test_judge(is_kernel, offset, rule):
    v = safety.judge(FOREIGN, 3, offset, is_kernel, frozenset({0}), [(16, 108), (116, 216)], "owner")
    assert v.rule == rule
    assert v.refused == (rule != safety.PADDING)


def test_judge_graph_finds_every_use_with_its_rule():
    """Node 0: TensorInfo (216 B) + a pointer + an 8-byte int; node 1: a memset record."""
    ti = tensor_info(dims=1, data=FOREIGN, fill={40: FOREIGN})  # data pointer (used) and sizes[8..9] (stale)
    kernel = ti + FOREIGN.to_bytes(8, "little") + (7).to_bytes(8, "little")
    memset = FOREIGN.to_bytes(8, "little") + bytes(32)
    payload = kernel + memset
    layout_ = [(0, 216), (216, 8), (224, 8)]

    def info(node, args):
        if node != 0:
            return None
        return safety.whole_word_params(layout_), safety.padding_ranges(TI_KERNEL, layout_, args)

    verdicts = safety.judge_graph(payload, [(0, 0, len(kernel)), (1, len(kernel), 40)], {FOREIGN: "dev mem"}, info)
    assert [(v.node, v.offset, v.rule) for v in verdicts] == [
        (0, 0, safety.IN_AGGREGATE), (0, 40, safety.PADDING), (0, 216, safety.WHOLE_PARAMETER),
        (1, 0, safety.NODE_ADDRESS)]
    assert [v.refused for v in verdicts] == [True, False, True, True]
    assert safety.judge_graph(payload, [(0, 0, 64)], {}, info) == []


# -- RNG state and addresses in the schema ----------------------------------------------------------------------
def manifest(**changes) -> schema.Manifest:
    cap_lo, cap_hi = 64 * MiB, 128 * MiB
    rng = changes.pop("rng", [schema.RngState(generator="default", seed_address=BASE + cap_lo + 512,
                                              offset_address=BASE + cap_lo + 1024, increment=8)])
    out = changes.pop("output", schema.TensorSpec(address=BASE + cap_lo + 4096, dtype="bfloat16", shape=[8, 512],
                                                  strides=[512, 1], storage_bytes=8 * 512 * 2))
    snap = changes.pop("snapshot", schema.MemorySnapshot(address=BASE + cap_lo, size=1024, blob="snap"))
    blob_size = changes.pop("blob_size", 1024)
    enc, _ = saved()
    fields = dict(
        schema_version=schema.SCHEMA_VERSION, created_utc="2026-11-30T12:00:00Z", fingerprint=FINGERPRINT,
        arena=schema.ArenaLayout(base=BASE, size=1 << 40, granularity=GRAN, capture_start=cap_lo, capture_end=cap_hi),
        blobs={"snap": schema.Blob(offset=64, stored_size=blob_size, size=blob_size, codec="raw", sha256="0" * 64)},
        images=[], functions=[], templates=[schema.GraphTemplate(num_nodes=0, kinds_sha256="", edges="t",
                                                                 num_edges=0)],
        graphs=[schema.GraphRecord(key="rng_bs8", template=0, nodes="t", payload="t", attrs="t", num_kernel_nodes=0,
                                   outputs=[out], rng=rng)],
        snapshots=[snap], trace=enc)
    fields.update(changes)
    return schema.Manifest(**fields)


def test_rng_state_and_trace_round_trip_through_an_archive(tmp_path):
    path = tmp_path / "rng.foundry"
    m = manifest()
    with ArchiveWriter(path) as w:
        w.add_blob("snap", b"\0" * 1024, compress=False)
        w.add_blob("t", b"")
        m = schema.Manifest(**{f: getattr(m, f) for f in m.__struct_fields__ if f != "blobs"}, blobs={})
        w.finish(m)
    with Archive.open(path) as a:
        got = a.manifest
    assert got.graphs[0].rng == m.graphs[0].rng and got.graphs[0].rng[0].increment == 8
    assert got.trace == m.trace and layout.decode(got.trace).tobytes() == trace(*SAVE_ORDER).tobytes()


def test_addresses_of_a_good_manifest_pass():
    layout.check_addresses(manifest())


@pytest.mark.parametrize("change, message", [
    (dict(rng=[schema.RngState(generator="default", seed_address=BASE + (200 << 20), offset_address=BASE + (64 << 20),
                               increment=8)]), "RNG seed .* outside the restored arena"),
    (dict(rng=[schema.RngState(generator="default", seed_address=BASE + (64 << 20) + 4,
                               offset_address=BASE + (64 << 20) + 16, increment=8)]), "misaligned"),
    (dict(rng=[schema.RngState(generator="default", seed_address=BASE + (64 << 20),
                               offset_address=BASE + (64 << 20) + 8, increment=6)]), "unusable RNG record"),
    (dict(rng=[schema.RngState(generator="cuda:7", seed_address=BASE + (64 << 20),
                               offset_address=BASE + (64 << 20) + 8, increment=4)]), "unusable RNG record"),
    (dict(snapshot=schema.MemorySnapshot(address=BASE + MiB, size=1024, blob="snap")), "outside the capture region"),
    (dict(snapshot=schema.MemorySnapshot(address=BASE + (128 << 20) - 512, size=1024, blob="snap")),
     "outside the capture region"),
    (dict(blob_size=1000), "records 1024 bytes but its blob holds 1000"),
    (dict(output=schema.TensorSpec(address=BASE + (2 << 30), dtype="float32", shape=[4], strides=[1],
                                   storage_bytes=16)), "outside the restored arena"),
    (dict(output=schema.TensorSpec(address=BASE + (64 << 20), dtype="float32", shape=[4, 4], strides=[4, 1],
                                   storage_bytes=16)), "needs 64 bytes, 16 recorded"),
    (dict(output=schema.TensorSpec(address=BASE + (64 << 20), dtype="float32", shape=[4], strides=[1, 1],
                                   storage_bytes=16)), "inconsistent shape"),
    (dict(output=schema.TensorSpec(address=BASE + (64 << 20), dtype="pickle", shape=[4], strides=[1],
                                   storage_bytes=16)), "unknown dtype"),
])
def test_bad_addresses_are_refused_before_touching_the_device(change, message):
    with pytest.raises(ArchiveError, match=message):
        layout.check_addresses(manifest(**change), "x.foundry")


def test_rng_state_is_recognised_by_its_pointer_pair_only():
    from foundry_core.save import rng_state_refs

    seed, offset = BASE + 0x3800000, BASE + 0x3800200
    philox = [BASE + 0x10, seed, offset, 0x1_0000_0008, 7]  # data ptr, PhiloxCudaState{seed*, offset*, 8, true}
    assert rng_state_refs(np.array(philox, "<u8"), {seed, offset}) == [seed, offset]
    stale = [BASE + 0x10, 3, seed, 4, offset, 5]  # lone copies in padding: no replay at SAVE
    assert rng_state_refs(np.array(stale, "<u8"), {seed, offset}) == []
    assert rng_state_refs(np.array([seed, seed], "<u8"), {seed, offset}) == []
    assert rng_state_refs(np.zeros(0, "<u8"), {seed}) == []


# -- replay-time RNG bookkeeping (torch.cuda.graphs' replay prologue) -----------------------------------------------
class Generator:
    """The three generator methods the prologue uses, on a plain object (CPU)."""

    def __init__(self, seed: int, offset: int):
        self.seed, self.offset = seed, offset

    def initial_seed(self):
        return self.seed

    def get_offset(self):
        return self.offset

    def set_offset(self, value):
        self.offset = value


def test_rng_prologue_advances_like_graph_replay():
    gen = Generator(seed=2**64 - 5, offset=40)  # a seed above int64's range, as torch.seed() may produce
    seed_t, offset_t = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    seen = []
    for _ in range(5):
        rng_prologue(gen, [(seed_t, offset_t, 12)])
        seen.append(int(offset_t))
        assert int(seed_t) % 2**64 == 2**64 - 5
    assert seen == [40, 52, 64, 76, 88] and gen.offset == 100


def test_output_constants_round_trip():
    """SGLang's decode graphs return a dataclass-like tree with None fields: None and plain constants are stored
    by value, tensors by address; the restored structure is the original one."""
    import torch
    from torch.utils import _pytree as pytree

    from foundry_core.errors import UnsupportedGraph
    from foundry_core.outputs import flatten_outputs, unflatten_outputs

    a, b = torch.zeros(2, 3), torch.ones(4, dtype=torch.int32)
    out = {"logits": a, "hidden": None, "ids": [b, 7, "x"], "flag": True}
    specs, tree, constants = flatten_outputs("g", out)
    assert [s.address for s in specs] == [a.data_ptr(), b.data_ptr()] and len(specs) == 2
    assert sorted(constants.values(), key=str) == sorted([None, 7, "x", True], key=str)
    back = unflatten_outputs([a, b], tree, constants)
    assert back["hidden"] is None and back["ids"][1:] == [7, "x"] and back["flag"] is True
    assert back["logits"] is a and back["ids"][0] is b
    assert pytree.tree_structure(back) == pytree.tree_structure(out)
    with pytest.raises(UnsupportedGraph, match="not a tensor or a constant"):
        flatten_outputs("g", {"bad": object()})


def test_every_torch_dtype_has_its_element_size():
    """LOAD checks output tensors by element size: a dtype missing from the table would refuse a valid archive."""
    import torch

    from foundry_core.layout import _ITEMSIZE

    checked = 0
    for name in dir(torch):
        dtype = getattr(torch, name)
        key = str(dtype).removeprefix("torch.")
        if not isinstance(dtype, torch.dtype) or key.startswith(("qint", "quint")):  # quantized: never outputs
            continue
        assert _ITEMSIZE.get(key) == dtype.itemsize, key
        checked += 1
    assert checked > 20
