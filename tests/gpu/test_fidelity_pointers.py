"""Fidelity of the pointer check at SAVE: a real out-of-arena pointer is refused (a tensor made before open();
foreign memory as a whole parameter, as a TensorInfo's data pointer, in the bytes of an unknown struct); a stale
foreign value in a struct's unused bytes does not block SAVE and restores bitwise. The raw kernels are built with
nvcc (sm_90).
"""
from __future__ import annotations

import concurrent.futures as cf
import subprocess
from pathlib import Path

import pytest

from gpu.bitwise import digest, poison
from gpu.fidelity import HIDDEN, KEY, SEEDS, Runner, outcome

pytestmark = pytest.mark.gpu


KERNELS_CU = r"""
namespace at { namespace cuda { namespace detail {
// The layout of PyTorch's TensorInfo (ATen/cuda/detail/TensorInfo.cuh): slots at and beyond dims are never read.
template <typename T, typename IndexType> struct TensorInfo {
    T* data; IndexType sizes[25]; IndexType strides[25]; int dims;
};
}}}
template <typename T, typename I>
__global__ void scale_info(at::cuda::detail::TensorInfo<T, I> src, T* dst, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && i < (int)src.sizes[0]) dst[i] = src.data[i * src.strides[0]] * 2.0f + 1.0f;
}
template __global__ void scale_info<float, unsigned int>(
    at::cuda::detail::TensorInfo<float, unsigned int>, float*, int);

struct Args { const float* src; float* dst; int n; int used; const void* spare[4]; };
extern "C" __global__ void scale_struct(Args a) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < a.n) a.dst[i] = a.src[i] * 2.0f + 1.0f;
}
extern "C" __global__ void scale_ptr(const float* src, float* dst, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i] * 2.0f + 1.0f;
}
"""


def build_kernels(workdir: Path) -> bytes:
    src = workdir / "ptr_kernels.cu"
    src.write_text(KERNELS_CU)
    cubin = workdir / "ptr_kernels.cubin"
    subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-o", str(cubin), str(src)], check=True, capture_output=True)
    return cubin.read_bytes()


class RawKernels:
    """Kernels from a cubin loaded with cuModuleLoadData, launched with cuLaunchKernel on torch's stream."""

    def __init__(self, cubin: bytes):
        import ctypes

        from cuda.bindings import driver as drv

        self.drv, self.ctypes = drv, ctypes
        self._image = ctypes.create_string_buffer(cubin, len(cubin))
        err, self.module = drv.cuModuleLoadData(ctypes.addressof(self._image))
        assert int(err) == 0, err
        err, count = drv.cuModuleGetFunctionCount(self.module)
        assert int(err) == 0, err
        err, funcs = drv.cuModuleEnumerateFunctions(count, self.module)
        assert int(err) == 0, err
        self.fn = {}
        for f in funcs:
            err, name = drv.cuFuncGetName(f)
            for short in ("scale_info", "scale_struct", "scale_ptr"):
                if short.encode() in name:
                    self.fn[short] = f
        assert len(self.fn) == 3, self.fn
        self._keep = []

    def launch(self, name: str, n: int, src: int, dst: int, spare: int = 0, spare_slot: int = 1):
        """scale_info: TensorInfo{src, sizes[0]=n, strides[0]=1, dims=1} with ``spare`` in sizes[2*slot..];
        scale_struct: Args{src, dst, n, 2, spare[slot]=spare}; scale_ptr: (src, dst, n)."""
        import torch

        c = self.ctypes
        if name == "scale_info":
            class Info(c.Structure):
                _fields_ = [("data", c.c_uint64), ("sizes", c.c_uint32 * 25), ("strides", c.c_uint32 * 25),
                            ("dims", c.c_int32)]

            info = Info(src)
            info.sizes[0], info.strides[0], info.dims = n, 1, 1
            if spare:  # an 8-byte stale address over sizes[2k], sizes[2k+1] (8-aligned in the parameter)
                k = 2 * spare_slot
                info.sizes[k], info.sizes[k + 1] = spare & 0xFFFFFFFF, spare >> 32
            args = [info, c.c_uint64(dst), c.c_int(n)]
        elif name == "scale_struct":
            class Args(c.Structure):
                _fields_ = [("src", c.c_uint64), ("dst", c.c_uint64), ("n", c.c_int), ("used", c.c_int),
                            ("spare", c.c_uint64 * 4)]

            spares = [0, 0, 0, 0]
            spares[spare_slot] = spare
            args = [Args(src, dst, n, 2, (c.c_uint64 * 4)(*spares))]
        else:
            args = [c.c_uint64(src), c.c_uint64(dst), c.c_int(n)]
        params = (c.c_void_p * len(args))(*[c.addressof(a) for a in args])
        self._keep.append((args, params))
        stream = self.drv.CUstream(torch.cuda.current_stream().cuda_stream)
        err, = self.drv.cuLaunchKernel(self.fn[name], (n + 255) // 256, 1, 1, 256, 1, 1, 0, stream,
                                       c.addressof(params), 0)
        assert int(err) == 0, err


def foreign_device_memory(nbytes: int) -> int:
    """Device memory from the driver directly: live, outside the arena, not a PyTorch allocation."""
    from cuda.bindings import driver as drv

    err, ptr = drv.cuMemAlloc(nbytes)
    assert int(err) == 0, err
    return int(ptr)


def child_ptr(archive, result, case, cubin_path):
    """SAVE with one pointer situation; ``stale`` also records output hashes for the LOAD half."""
    import torch

    import foundry_core as fc
    from foundry_core.recorder import ImageRecorder

    pre_open = None
    if case == "pre-open-tensor":
        ImageRecorder().start()  # before CUDA work, as Session.open() would; open() then reuses it
        torch.cuda.init()
        pre_open = torch.randn(HIDDEN, device="cuda")  # before Session.open(): PyTorch's default pool
    s = fc.Session(archive, mode="save", key=f"{KEY}-ptr-{case}", progress=False).open()
    kernels = RawKernels(Path(cubin_path).read_bytes()) if case != "pre-open-tensor" else None
    x = torch.randn(HIDDEN, device=s.device)
    y = torch.zeros(HIDDEN, device=s.device)
    foreign = foreign_device_memory(1 << 20) if kernels else 0

    def forward():
        if case == "pre-open-tensor":
            return x * pre_open + 1
        if case == "foreign-whole-param":
            kernels.launch("scale_ptr", HIDDEN, foreign, y.data_ptr())
        elif case == "foreign-tensorinfo-data":  # the TensorInfo's data pointer is foreign: really used
            kernels.launch("scale_info", HIDDEN, foreign, y.data_ptr())
        elif case == "stale-tensorinfo":  # sizes[2..3] (unused, dims=1) hold a live foreign address
            kernels.launch("scale_info", HIDDEN, x.data_ptr(), y.data_ptr(), spare=foreign)
        elif case == "unknown-struct":  # spare[1] of a struct Foundry knows nothing about: cannot prove unused
            kernels.launch("scale_struct", HIDDEN, x.data_ptr(), y.data_ptr(), spare=foreign)
        return y

    def run():
        graph = None
        with s.capture_phase():
            graph = s.capture("g", forward, warmups=1)
        s.save()
        hashes = []
        for seed in SEEDS:
            x.copy_(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)).cuda())
            poison(y)
            graph.replay()
            hashes.append(digest(y))
        return {"hashes": hashes, "stale_words": s.save_stats.get("stale_words") or 0}

    outcome(run, result)


def child_ptr_load(archive, result, cubin_path):
    import torch

    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=f"{KEY}-ptr-stale-tensorinfo", progress=False).open()
        RawKernels(Path(cubin_path).read_bytes())  # same init as SAVE (module load allocates nothing in the arena)
        x = torch.randn(HIDDEN, device=s.device)
        y = torch.zeros(HIDDEN, device=s.device)  # kept alive: the graph writes it (LOAD checks live blocks)
        rg = s.restore()["g"]
        hashes = []
        for seed in SEEDS:
            x.copy_(torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)).cuda())
            poison(rg.outputs)
            rg.replay()
            hashes.append(digest(rg.outputs))
        del y
        return {"hashes": hashes}

    outcome(run, result)


def check_pointers(r: Runner) -> list[tuple[str, str, str]]:
    rows = []
    cubin = r.out / "ptr_kernels.cubin"
    try:
        build_kernels(r.out)
    except Exception as e:  # nvcc missing or failing: only the PyTorch row can run
        cubin = None
        rows.append(("pointer check: raw kernels", "FAIL", f"nvcc: {e}"[:300]))
    refusals = [("pre-open-tensor", "pre-open tensor (elementwise) -> refused", "inside a struct"),
                ("foreign-whole-param", "foreign whole parameter -> refused", "whole pointer-sized"),
                ("foreign-tensorinfo-data", "foreign TensorInfo.data -> refused", "inside a struct"),
                ("unknown-struct", "foreign in unknown struct bytes -> refused", "inside a struct")]
    cases = [c for c in refusals if cubin is not None or c[0] == "pre-open-tensor"]
    with cf.ThreadPoolExecutor(len(cases) + 1) as ex:
        futs = [ex.submit(r.child, f"ptr-{c}", child_ptr, str(r.out / f"ptr-{c}.foundry"), c, str(cubin or "-"))
                for c, _, _ in cases]
        stale = (ex.submit(r.child, "ptr-stale", child_ptr, str(r.out / "ptr-stale.foundry"), "stale-tensorinfo",
                           str(cubin)) if cubin is not None else None)
        for (case, title, rule), fut in zip(cases, futs):
            e = fut.result().get("error") or ""
            good = e.startswith("UnsafeAddress") and rule in e
            rows.append((f"pointer: {title}", "PASS" if good else "FAIL", e[:300] or "NOT refused"))
        if stale is None:
            return rows
        save = stale.result()
    if save.get("error"):
        rows.append(("pointer: stale in TensorInfo unused slots -> saved", "FAIL",
                     "SAVE: " + save["error"][:300]))
        return rows
    load = r.child("ptr-stale-load", child_ptr_load, str(r.out / "ptr-stale.foundry"), str(cubin))
    good = not load.get("error") and load["hashes"] == save["hashes"] and save["stale_words"] >= 1
    rows.append(("pointer: stale in TensorInfo unused slots -> saved", "PASS" if good else "FAIL",
                 load.get("error") or f"saved ({save['stale_words']:.0f} stale word ignored), LOAD "
                 f"{sum(a == b for a, b in zip(load['hashes'], save['hashes']))}/{len(save['hashes'])} bitwise"))
    return rows


def test_foreign_pointers_are_refused_and_stale_ones_saved(fidelity, verdicts):
    fidelity(check_pointers)
    verdicts.assert_passed()
