"""CPU tests of the graph codec's pure parts, the pointer-safety scan and the native library's build."""
import ctypes

import numpy as np
import pytest

from foundry_core import codec, native, safety, schema
from foundry_core.errors import NativeBuildError


# -- topological order ---------------------------------------------------------------------------------------------
def test_topological_order_respects_edges_and_is_stable():
    # 0 -> 3, 2 -> 1, 1 -> 3 ; nodes 4 isolated
    src = np.array([0, 2, 1])
    dst = np.array([3, 1, 3])
    order = codec.topological_order(5, src, dst).tolist()
    pos = {n: i for i, n in enumerate(order)}
    assert all(pos[s] < pos[d] for s, d in zip(src, dst))
    assert order == [0, 2, 1, 3, 4]  # ties broken by original index


def test_topological_order_random_dags():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        perm = rng.permutation(n)
        pairs = [(perm[a], perm[b]) for a in range(n) for b in range(a + 1, n) if rng.random() < 0.1]
        src = np.array([p[0] for p in pairs], dtype=np.int64)
        dst = np.array([p[1] for p in pairs], dtype=np.int64)
        order = codec.topological_order(n, src, dst)
        assert sorted(order.tolist()) == list(range(n))
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        assert (pos[src] < pos[dst]).all()


def test_topological_order_rejects_cycle():
    with pytest.raises(ValueError, match="cycle"):
        codec.topological_order(3, np.array([0, 1, 2]), np.array([1, 2, 0]))


# -- kernel arguments ----------------------------------------------------------------------------------------------
def test_pack_kernel_params_places_values_at_device_offsets():
    a = ctypes.c_uint64(0x7F00_1234_5678)
    b = ctypes.c_int32(-7)
    c = (ctypes.c_uint8 * 24)(*range(24))  # a by-value struct
    layout = [(0, 8), (8, 4), (16, 24)]
    ptrs = [ctypes.addressof(a), ctypes.addressof(b), ctypes.addressof(c)]
    buf = codec.pack_kernel_params(layout, ptrs, codec.host_read)
    assert len(buf) == 40
    assert int.from_bytes(buf[0:8], "little") == 0x7F00_1234_5678
    assert int.from_bytes(buf[8:12], "little", signed=True) == -7
    assert buf[12:16] == b"\0\0\0\0"  # alignment padding is zeroed, never copied from the host
    assert buf[16:40] == bytes(range(24))


def test_pack_kernel_params_rejects_null_entry():
    with pytest.raises(ValueError, match="NULL"):
        codec.pack_kernel_params([(0, 8)], [0], codec.host_read)


def _extra_array(values):
    arr = (ctypes.c_uint64 * len(values))(*values)
    return arr, (lambda i: arr[i])


def test_parse_extra_buffer_and_size():
    payload = (ctypes.c_uint8 * 32)(*range(32))
    size = ctypes.c_size_t(32)
    arr, words = _extra_array([codec.CU_LAUNCH_PARAM_BUFFER_POINTER, ctypes.addressof(payload),
                               codec.CU_LAUNCH_PARAM_BUFFER_SIZE, ctypes.addressof(size), codec.CU_LAUNCH_PARAM_END])
    buf, size_ptr = codec.parse_extra(words)
    assert buf == ctypes.addressof(payload)
    assert codec.host_word(size_ptr) == 32
    assert codec.host_read(buf, 32) == bytes(range(32))


@pytest.mark.parametrize("values, match", [
    ([7, 0, 0], "unknown"),
    ([1, 1234, 0], "lacks"),
])
def test_parse_extra_rejects_malformed(values, match):
    arr, words = _extra_array(values)
    with pytest.raises(ValueError, match=match):
        codec.parse_extra(words)


def test_parse_extra_rejects_unterminated():
    arr, words = _extra_array([1, 1] * 40)
    with pytest.raises(ValueError, match="terminated"):
        codec.parse_extra(words)


# -- edges and templates -------------------------------------------------------------------------------------------
def test_edge_records_keep_edge_data():
    e = np.zeros(2, schema.EDGE_DTYPE)
    e[0] = (0, 1, 0, 0, 0, 0)
    e[1] = (1, 2, 1, 0, 1, 0)  # programmatic dependent-launch edge: from_port 1, type 1
    raw = e.tobytes()
    back = np.frombuffer(raw, schema.EDGE_DTYPE)
    assert back[1]["from_port"] == 1 and back[1]["type"] == 1 and back[0]["type"] == 0


def test_template_identity_sees_edge_data_and_kinds_not_kernels():
    kinds = np.zeros(3, np.uint32)
    e = np.zeros(2, schema.EDGE_DTYPE)
    e["src"], e["dst"] = [0, 1], [1, 2]
    base = codec.template_identity(kinds, e)
    e2 = e.copy()
    e2[1]["type"] = 1
    assert codec.template_identity(kinds, e2) != base
    kinds2 = kinds.copy()
    kinds2[1] = schema.NODE_MEMSET
    assert codec.template_identity(kinds2, e) != base
    assert codec.template_identity(kinds.copy(), e.copy()) == base


def test_record_layouts_are_fixed():
    assert schema.NODE_DTYPE.itemsize == 64 and schema.NODE_DTYPE.fields["payload_off"][1] == 0
    assert schema.ATTR_DTYPE.itemsize == 72
    assert schema.EDGE_DTYPE.itemsize == 16
    assert schema.MEMSET_DTYPE.itemsize == 40


# -- pointer safety ------------------------------------------------------------------------------------------------
def test_candidate_words_excludes_arena_small_values_and_dedupes():
    lo, hi = 0x6A00_0000_0000, 0x6A00_0000_0000 + (1 << 40)
    words = np.array([0, 5, lo + 64, 0x7F00_0000_1000, 0x7F00_0000_1000, 1 << 60, hi - 8], dtype="<u8")
    got = safety.candidate_words(words.tobytes(), [(0, len(words) * 8)], lo, hi)
    assert got.tolist() == [0x7F00_0000_1000]


def test_candidate_words_reads_only_given_spans():
    words = np.array([0x7F00_0000_1000, 0x7F00_0000_2000], dtype="<u8").tobytes()
    assert safety.candidate_words(words, [(8, 8)], 0, 1).tolist() == [0x7F00_0000_2000]


def test_pointer_oracle_only_flags_live_memory_and_caches():
    calls = []

    def query(addr):
        calls.append(addr)
        return "device memory 0x7f00+4096 allocated outside the Foundry arena" if addr == 0x7F00_0000_1000 else None

    oracle = safety.PointerOracle(query)
    words = np.array([0x7F00_0000_1000, 0x7F00_DEAD_BEE8], dtype=np.uint64)
    found = oracle.foreign(words)
    assert [f.address for f in found] == [0x7F00_0000_1000]
    oracle.foreign(words)
    assert len(calls) == 2  # answers cached


# -- native library ------------------------------------------------------------------------------------------------
def test_native_library_builds_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path))
    path = native.library_path("foundry_native_test", ["driver.c", "arena.c", "restore.c"])
    lib = ctypes.CDLL(str(path))
    for sym in ("foundry_arena_init", "foundry_arena_malloc", "foundry_arena_free", "foundry_arena_map",
                "foundry_build_graph", "foundry_instantiate", "foundry_launch"):
        assert hasattr(lib, sym)
    lib.foundry_sizeof_memcpy3d.restype = ctypes.c_size_t
    assert lib.foundry_sizeof_memcpy3d() == 200
    # cached: same path, no rebuild
    assert native.library_path("foundry_native_test", ["driver.c", "arena.c", "restore.c"]) == path


def test_native_build_without_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(NativeBuildError, match="C compiler"):
        native.library_path("foundry_native_nocc", ["driver.c"])


def test_arena_without_driver_reports_one_line(tmp_path, monkeypatch):
    """On a machine without the CUDA driver, reserving the arena fails with a clear reason, not a crash."""
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path))
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("a CUDA driver is present on this machine")
    except OSError:
        pass
    from foundry_core.allocator import Arena
    from foundry_core.errors import ArenaUnavailable

    with pytest.raises(ArenaUnavailable, match="libcuda.so.1"):
        Arena(0).reserve()


def test_describe_holder_names_host_mappings():
    from foundry_core.allocator import describe_holder

    maps = ("6a0000000000-6b0000000000 ---p 00000000 00:00 0 \n"
            "7f0000000000-7f0000100000 r--p 00000000 08:01 42    /usr/lib/libfoo.so\n")
    assert "anonymous mapping" in describe_holder(0x6A00_0000_0000, 0x6A10_0000_0000, maps)
    assert "/usr/lib/libfoo.so" in describe_holder(0x7F00_0000_0000, 0x7F00_0000_1000, maps)
    assert "device-memory reservation" in describe_holder(0x1000, 0x2000, maps)
    assert describe_holder(0x10, 0x20).startswith("held by")  # live /proc/self/maps parses
