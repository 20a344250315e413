"""foundry_core.recorder and foundry_core.images on CPU: the native recorder (built and driven through its
callback entry point), the pure image-matching logic, archive selection, and clear errors where a driver would
be needed."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from conftest import missing_tools

from foundry_core import cubin, native, recorder
from foundry_core import images as imgs
from foundry_core.errors import DeviceUnavailable, FoundryError, UnsupportedGraph
from foundry_core.options import Options
from foundry_core.schema import KernelFunction, KernelImage

EXPORTS = [
    "foundry_cupti_abi", "foundry_cupti_cuda_state", "foundry_cupti_start", "foundry_cupti_stop",
    "foundry_cupti_active", "foundry_cupti_driver_callbacks", "foundry_cupti_stats", "foundry_cupti_image_info",
    "foundry_cupti_image_copy", "foundry_cupti_module_count", "foundry_cupti_module_info", "foundry_cupti_clear",
    "foundry_cupti_inject", "foundry_cupti_global_callbacks", "foundry_cupti_global_count",
    "foundry_cupti_global_info", "foundry_cupti_inject_global",
]


# --- native recorder --------------------------------------------------------------------------------------


@pytest.fixture
def lib():
    if missing_tools():
        pytest.skip(missing_tools())
    cupti = native.cupti_lib()  # with a compiler and cuda.h, a failing build is a failure
    cupti.foundry_cupti_clear()
    yield cupti
    cupti.foundry_cupti_clear()


def test_native_library_compiles_and_exports(lib):
    for name in EXPORTS:
        assert hasattr(lib, name), name
    assert lib.foundry_cupti_abi() == native.CUPTI_ABI
    out = subprocess.run(["nm", "-D", lib._foundry_path], capture_output=True, text=True).stdout \
        if shutil.which("nm") else ""
    if out:  # no link-time dependency on CUPTI or the driver
        undefined = [line.split()[-1] for line in out.splitlines() if " U " in line]
        assert not any(s.startswith(("cupti", "cu")) and not s.startswith("__") for s in undefined), undefined


CUDA_STATE_PROBE = """
import ctypes, sys
from foundry_core import native
lib = native.cupti_lib()
print(lib.foundry_cupti_cuda_state())           # libcuda not loaded yet
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError:
    sys.exit(0)                                 # no driver on this machine
print(lib.foundry_cupti_cuda_state())           # loaded, not initialised
if cuda.cuInit(0) == 0:
    print(lib.foundry_cupti_cuda_state())       # initialised, no context yet
"""


def _driver_usable() -> bool:
    """Whether cuInit succeeds here (asked in a child, so this process stays uninitialised)."""
    code = "import ctypes, sys\ntry:\n    c = ctypes.CDLL('libcuda.so.1')\nexcept OSError:\n    sys.exit(1)\n" \
           "sys.exit(0 if c.cuInit(0) == 0 else 1)"
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cuda_state_follows_the_driver(lib):
    """Each state the probe can tell apart, in the order a process goes through them."""
    out = subprocess.run([sys.executable, "-c", CUDA_STATE_PROBE], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))).stdout.split()
    states = [int(x) for x in out]
    expected = [recorder.CUDA_NOT_LOADED]
    if _driver_usable():
        expected += [recorder.CUDA_NOT_INITIALISED, recorder.CUDA_INITIALISED]
    elif os.path.exists("/dev/nvidiactl"):
        pytest.skip("a driver is installed but cuInit fails here; no defined order of states")
    assert states == expected


def _inject(lib, module_id: int, data: bytes, loaded: bool = True, handle: int = 0):
    lib.foundry_cupti_inject(module_id, data, len(data), int(loaded), handle)


def test_recorder_keeps_distinct_images_in_load_order(lib):
    a, b = b"\x7fELF-image-a" * 10, b"\x7fELF-image-b" * 20
    _inject(lib, 1, a)
    _inject(lib, 2, b)
    _inject(lib, 3, a)  # same bytes loaded again: one image, two loads
    rec = recorder.ImageRecorder()
    images = rec.images()
    assert [im.data for im in images] == [a, b]
    assert [im.module_id for im in images] == [1, 2]
    assert images[0].loads == 2 and images[1].loads == 1
    assert images[0].order < images[1].order
    assert images[0].sha256 == hashlib.sha256(a).hexdigest() and images[0].size == len(a)
    assert rec.stats() == {"images": 2, "bytes": len(a) + len(b), "events": 3, "out_of_memory": 0}


def test_recorder_unloads_and_images_seen_only_at_unload(lib):
    a, early = b"A" * 100, b"E" * 50
    _inject(lib, 1, a)
    _inject(lib, 1, a, loaded=False)
    _inject(lib, 9, early, loaded=False)  # loaded before recording started: caught at unload
    images = recorder.ImageRecorder().images()
    assert images[0].unloads == 1 and not images[0].seen_at_unload
    assert images[1].data == early and images[1].seen_at_unload and images[1].loads == 0


def test_recorder_pairs_module_handles(lib):
    a, b = b"A" * 64, b"B" * 64
    _inject(lib, 1, a, handle=0x1000)
    _inject(lib, 2, b, handle=0x2000)
    _inject(lib, 3, b)  # loaded by the runtime, no cuModuleLoad call seen: no pairing
    rec = recorder.ImageRecorder()
    assert rec.module_images() == {0x1000: 0, 0x2000: 1}
    _inject(lib, 1, a, loaded=False)  # module 1 unloaded: its handle may be reused, forget it
    assert rec.module_images() == {0x2000: 1}


def test_recorder_keeps_addresses_of_module_variables(lib):
    """cuModuleGetGlobal_v2 / cuLibraryGetGlobal exits: (name, address, size) once per address, the handle asked."""
    lib.foundry_cupti_inject_global(b"_ZN6cublas8internal15deviceConstantsE", 0x7F0000001000, 112, 0xAB, 1)
    lib.foundry_cupti_inject_global(b"counter", 0x7F0000002000, 4, 0xCD, 0)
    lib.foundry_cupti_inject_global(b"_ZN6cublas8internal15deviceConstantsE", 0x7F0000001000, 112, 0xAB, 1)
    got = recorder.ImageRecorder().globals()
    assert got == [
        recorder.ModuleGlobal("_ZN6cublas8internal15deviceConstantsE", 0x7F0000001000, 112, 0xAB, True),
        recorder.ModuleGlobal("counter", 0x7F0000002000, 4, 0xCD, False),
    ]
    lib.foundry_cupti_clear()
    assert recorder.ImageRecorder().globals() == []


def test_start_with_missing_libcupti_is_a_clear_error(lib):
    with pytest.raises(recorder.ImageCaptureError, match="cannot load libcupti"):
        recorder.ImageRecorder().start("/nonexistent/libcupti.so.13")
    assert not recorder.ImageRecorder().active


def test_find_libcupti_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FOUNDRY_LIBCUPTI", str(tmp_path / "missing.so"))
    with pytest.raises(recorder.ImageCaptureError, match="FOUNDRY_LIBCUPTI"):
        recorder.find_libcupti(Options.from_env().libcupti)
    fake = tmp_path / "libcupti.so.13"
    fake.write_bytes(b"")
    monkeypatch.setenv("FOUNDRY_LIBCUPTI", str(fake))
    assert recorder.find_libcupti(Options.from_env().libcupti) == str(fake)
    assert recorder.ImageRecorder().options.libcupti == str(fake)  # a recorder without a Session reads it too


def test_start_with_real_libcupti(lib, monkeypatch):
    """Without a usable GPU driver, subscription must fail with a one-line reason that says so (before:
    `cuptiSubscribe failed: CUPTI_ERROR_UNKNOWN (999)`); with one it must work."""
    monkeypatch.delenv("FOUNDRY_LIBCUPTI", raising=False)
    try:
        path = recorder.find_libcupti()
    except recorder.ImageCaptureError:
        pytest.skip("no libcupti installed")
    rec = recorder.ImageRecorder()
    if not _driver_usable():
        with pytest.raises(DeviceUnavailable) as info:
            rec.start(path)
        assert "\n" not in str(info.value) and str(info.value).startswith("no usable CUDA device: ")
        assert not rec.active
        return
    rec.start(path)
    assert rec.active
    rec.stop()
    assert not rec.active


# --- matching (pure) --------------------------------------------------------------------------------------


def K(name, regs=32, shared=0, max_threads=None):
    return cubin.KernelInfo(name=name, registers=regs, shared_bytes=shared, max_threads=max_threads)


def facts(index, kernels, sha=None):
    ks = {k.name: k for k in kernels}
    return imgs.ImageFacts(index, sha or f"{index:064x}", frozenset(ks), ks)


def module(names, used, known=None):
    return imgs.ModuleFacts(frozenset(names), {n: dict(a) for n, a in used.items()}, known)


REGS, SHARED, LOCAL = imgs.ATTR_NUM_REGS, imgs.ATTR_SHARED_SIZE_BYTES, imgs.ATTR_LOCAL_SIZE_BYTES


def test_duplicate_kernel_names_across_images_match_by_name_set():
    images = [facts(0, [K("gemm"), K("softmax")]), facts(1, [K("gemm")]), facts(2, [K("gemm"), K("relu")])]
    assert imgs.choose_image(module({"gemm"}, {"gemm": {REGS: 32}}), images) == (1, "names")
    assert imgs.choose_image(module({"gemm", "relu"}, {"gemm": {REGS: 32}}), images)[0] == 2


def test_identical_images_count_once(tmp_path):
    blob = _tiny_cubin(tmp_path)
    facts_list = imgs.image_facts([blob, b"junk", blob], arch=90)
    assert [f.index for f in facts_list] == [0, 1]  # the second copy of blob is dropped
    assert facts_list[1].names is None and "not a CUDA module image" in facts_list[1].problem
    names = facts_list[0].names
    assert imgs.choose_image(module(names, {"tiny_a": {}}), facts_list) == (0, "names")


def test_same_names_narrowed_by_cubin_facts():
    images = [facts(0, [K("triton_red", regs=40)]), facts(1, [K("triton_red", regs=56)])]
    got = imgs.choose_image(module({"triton_red"}, {"triton_red": {REGS: 56}}), images)
    assert got == (1, "names+cubin")


def test_shared_memory_allows_the_system_reservation():
    k = K("k", shared=5120)
    assert imgs.consistent_with_cubin(k, {SHARED: 5120}) and imgs.consistent_with_cubin(k, {SHARED: 4096})
    assert not imgs.consistent_with_cubin(k, {SHARED: 2048})
    bounded = K("b", max_threads=(128, 1, 1))
    assert imgs.consistent_with_cubin(bounded, {imgs.ATTR_MAX_THREADS_PER_BLOCK: 128})
    assert not imgs.consistent_with_cubin(bounded, {imgs.ATTR_MAX_THREADS_PER_BLOCK: 1024})


def test_same_names_and_cubin_facts_narrowed_by_probe():
    images = [facts(0, [K("k")]), facts(1, [K("k")])]
    fresh = {0: (frozenset({"k"}), {"k": {REGS: 32, LOCAL: 0}}), 1: (frozenset({"k"}), {"k": {REGS: 32, LOCAL: 16}})}
    got = imgs.choose_image(module({"k"}, {"k": {REGS: 32, LOCAL: 16}}), images, probe=fresh.__getitem__)
    assert got == (1, "names+probe")


def test_ambiguous_images_raise_unsupported_graph_naming_kernel_and_candidates():
    images = [facts(0, [K("k")], sha="a" * 64), facts(1, [K("k")], sha="b" * 64)]
    def same(i):
        return frozenset({"k"}), {"k": {REGS: 32}}

    with pytest.raises(UnsupportedGraph) as err:
        imgs.choose_image(module({"k"}, {"k": {REGS: 32}}), images, probe=same)
    msg = str(err.value)
    assert "kernel k" in msg and "#0 (aaaaaaaaaaaa)" in msg and "#1 (bbbbbbbbbbbb)" in msg and "\n" not in msg


def test_no_matching_image_is_explained():
    images = [facts(0, [K("a")]), imgs.ImageFacts(1, "c" * 64, None, problem="zstd-compressed")]
    with pytest.raises(UnsupportedGraph, match="recorder started before CUDA.*could not be read \\(zstd"):
        imgs.choose_image(module({"b"}, {"b": {}}), images)
    with pytest.raises(UnsupportedGraph, match="no functions"):
        imgs.choose_image(module(set(), {"b": {}}), images)


def test_probe_rejects_a_name_match_with_other_attributes():
    images = [facts(0, [K("k")])]
    def fresh(i):
        return frozenset({"k"}), {"k": {REGS: 99}}

    with pytest.raises(UnsupportedGraph, match="none loads with the same"):
        imgs.choose_image(module({"k"}, {"k": {REGS: 32}}), images, probe=fresh)


def test_known_handle_wins_and_is_verified():
    images = [facts(0, [K("k")]), facts(1, [K("k")])]
    ok = {0: (frozenset({"k"}), {"k": {REGS: 32}}), 1: (frozenset({"k"}), {"k": {REGS: 32}})}
    assert imgs.choose_image(module({"k"}, {"k": {REGS: 32}}, known=1), images, probe=ok.__getitem__) == (1, "handle")
    # the recorded pairing disagrees with the module's functions: fall back to names (and find 0)
    images2 = [facts(0, [K("k")]), facts(1, [K("other")])]
    assert imgs.choose_image(module({"k"}, {"k": {REGS: 32}}, known=1), images2) == (0, "names")


def test_changed_attributes_only_settable_and_different():
    defaults = {imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: 0, imgs.ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT: -1,
                imgs.ATTR_REQUIRED_CLUSTER_WIDTH: 0}
    current = {imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: 200_000, imgs.ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT: -1,
               imgs.ATTR_REQUIRED_CLUSTER_WIDTH: 0, REGS: 40}
    assert imgs.changed_attributes(current, defaults) == {imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: 200_000}


def test_attribute_application_order():
    attrs = [imgs.ATTR_REQUIRED_CLUSTER_WIDTH, imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES,
             imgs.ATTR_NON_PORTABLE_CLUSTER_SIZE_ALLOWED]
    assert sorted(attrs, key=imgs._attribute_order)[0] == imgs.ATTR_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


# --- archive selection ------------------------------------------------------------------------------------


def test_select_images_dedupes_and_indexes(tmp_path):
    blob = _tiny_cubin(tmp_path)
    other = b"\x7fELF" + b"\0" * 60  # unparseable: stored with no kernel list
    sha = hashlib.sha256(blob).hexdigest()
    osha = hashlib.sha256(other).hexdigest()
    refs = [
        imgs.FunctionRef(1, "tiny_a", 0, sha, {imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: 65536}, "names"),
        imgs.FunctionRef(2, "tiny_b", 0, sha, {}, "names"),
        imgs.FunctionRef(3, "tiny_a", 0, sha, {imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: 65536}, "names"),
        imgs.FunctionRef(4, "x", 1, osha, {}, "handle"),
    ]
    stored, functions = imgs.select_images([blob, other], refs)
    assert [s.sha256 for s in stored] == [sha, osha]
    assert stored[0].kernels == ["tiny_a", "tiny_b"] and stored[1].kernels == []
    assert functions == [
        KernelFunction(image=0, name="tiny_a", attributes={imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES: 65536}),
        KernelFunction(image=0, name="tiny_b", attributes={}),
        KernelFunction(image=1, name="x", attributes={}),
    ]
    rec = stored[0].record("image/abc")
    assert rec == KernelImage(sha256=sha, blob="image/abc", size=len(blob), kernels=["tiny_a", "tiny_b"])


# --- driver layer without a driver ------------------------------------------------------------------------


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU driver is present")
def test_driver_calls_fail_with_one_line_errors():
    for call in (lambda: imgs.resolve_functions([1], []), lambda: imgs.load_images([b"x"]), imgs.loading_mode,
                 lambda: imgs.get_functions([1], [KernelFunction(image=0, name="k")])):
        with pytest.raises(FoundryError) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(FoundryError, match="only 0 are loaded"):
        imgs.get_functions([], [KernelFunction(image=0, name="k")])


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="a GPU driver is present")
@pytest.mark.parametrize("path", ["python", "native"])
def test_load_kernels_fails_with_one_line_errors_on_either_path(path, tmp_path):
    """The native kernel loader builds with the helper and speaks the Python path's errors."""
    lib = None
    if path == "native":
        from foundry_core import native
        from foundry_core.options import Options

        try:
            lib = native.native_lib(Options.from_env({"FOUNDRY_CACHE_DIR": str(tmp_path)}))
        except FoundryError as e:
            pytest.skip(f"native helper not buildable here: {e}")
    with pytest.raises(FoundryError, match="only 1 are loaded"):
        imgs.load_kernels([b"x"], [KernelFunction(image=1, name="k")], lib=lib)
    with pytest.raises(FoundryError, match="out of range"):
        imgs.load_kernels([b"x"], [KernelFunction(image=0, name="k", attributes={8: 2**40})], lib=lib)
    with pytest.raises(FoundryError) as err:  # no driver on this machine
        imgs.load_kernels([b"x", bytearray(b"y")], [KernelFunction(image=0, name="k")], lib=lib)
    assert "\n" not in str(err.value)
    if lib is not None:
        assert "libcuda.so.1" in str(err.value)


# --- helpers ----------------------------------------------------------------------------------------------

_TINY_CU = r"""
extern "C" __global__ void tiny_a(float* p) { p[threadIdx.x] = 1.f; }
extern "C" __global__ void tiny_b(float* p) { p[threadIdx.x] = 2.f; }
"""


def _tiny_cubin(tmp_path) -> bytes:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: needed to build a test cubin")
    src = tmp_path / "tiny.cu"
    src.write_text(_TINY_CU)
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-o", str(tmp_path / "tiny.cubin"), str(src)], check=True)
    return (tmp_path / "tiny.cubin").read_bytes()


def test_ctypes_signatures_are_declared(lib):
    for name in EXPORTS:
        fn = getattr(lib, name)
        assert fn.argtypes is not None, name
    assert lib.foundry_cupti_image_copy.restype is ctypes.c_int64


def test_select_images_merges_copies_of_one_function():
    dyn, carve = imgs.ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, imgs.ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT
    blob = b"\x7fELF" + b"\0" * 60
    sha = hashlib.sha256(blob).hexdigest()
    refs = [imgs.FunctionRef(1, "k", 0, sha, {dyn: 1000}, "names"),
            imgs.FunctionRef(2, "k", 0, sha, {dyn: 9000}, "names")]
    _, functions = imgs.select_images([blob], refs)
    assert functions == [KernelFunction(image=0, name="k", attributes={dyn: 9000})]
    refs.append(imgs.FunctionRef(3, "k", 0, sha, {dyn: 9000, carve: 50}, "names"))
    with pytest.raises(UnsupportedGraph, match="kernel k"):
        imgs.select_images([blob], refs)


def test_recorder_is_thread_safe(lib):
    import threading

    blobs = [bytes([i]) * (1000 + i) for i in range(16)]

    def worker(t):
        for k in range(200):
            _inject(lib, t * 1000 + k, blobs[(t + k) % len(blobs)], handle=0x10000 * (t + 1) + k)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    images = recorder.ImageRecorder().images()
    assert sorted(im.data for im in images) == sorted(blobs)
    assert sum(im.loads for im in images) == 8 * 200
    assert len(recorder.ImageRecorder().module_images()) == 8 * 200


def test_select_images_refuses_a_different_image_list():
    ref = imgs.FunctionRef(1, "k", 0, hashlib.sha256(b"one").hexdigest(), {}, "names")
    with pytest.raises(FoundryError, match="not the one it was resolved to"):
        imgs.select_images([b"two"], [ref])
    with pytest.raises(FoundryError, match="not the one"):
        imgs.select_images([], [ref])


def test_start_after_torch_initialised_cuda_warns_loudly(lib, monkeypatch, recwarn):
    """The check reads torch.cuda.is_initialized(); a stand-in module plays a torch that already did CUDA work."""
    import sys
    import types

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    with pytest.raises(FoundryError):  # the missing library, or (libcupti already loaded) no device here
        recorder.ImageRecorder().start("/nonexistent/libcupti.so.13")
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert any("MISSED" in m and "torch.cuda is initialised" in m for m in messages)
