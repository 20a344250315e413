"""foundry_core.recorder and .images on the GPU: kernel images recorded at SAVE, loaded in fresh processes.

SAVE process: arm the ImageRecorder before torch touches CUDA, run a matmul (cuBLASLt), softmax (ATen),
SDPA (flash/cuDNN), a torch.compile'd function (Inductor/Triton) and a hand-written Triton kernel autotuned
over three configs that share one kernel name; capture all of it in one CUDA graph; read every kernel node
through cuda.bindings (cuGraphGetNodes / cuGraphNodeGetType / cuGraphKernelNodeGetParams, child graphs
included); resolve each node's CUfunction to its recorded image; compare what cubin.py parsed with what the
driver reports; write the needed images and KernelFunction records.
LOAD processes (fresh, no torch): load_images + get_functions under CUDA_MODULE_LOADING=LAZY and EAGER, check
every function's name, identity attributes (regs, shared, local, const, max threads) and re-applied attributes.
Error paths: CUPTI held by another subscriber -> clear ImageCaptureError; recorder started after CUDA init ->
RuntimeWarning.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from gpu.fresh import run_function

pytestmark = pytest.mark.gpu

# ---------------------------------------------------------------------------------------------------------
# SAVE side
# ---------------------------------------------------------------------------------------------------------


def graph_kernel_functions(graph_handle: int) -> list[int]:
    """CUfunction of every kernel node (child graphs included), in node order."""
    from cuda.bindings import driver as drv

    from foundry_core.native import call as _call

    out: list[int] = []

    def walk(graph):
        _, count = _call("cuGraphGetNodes", drv.cuGraphGetNodes, graph, 0)
        nodes, _ = _call("cuGraphGetNodes", drv.cuGraphGetNodes, graph, count)
        for node in nodes[:count]:
            kind = _call("cuGraphNodeGetType", drv.cuGraphNodeGetType, node)
            if kind == drv.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
                params = _call("cuGraphKernelNodeGetParams", drv.cuGraphKernelNodeGetParams, node)
                func = int(params.func)
                if not func and int(params.kern):  # launched through a CUkernel: its function in this context
                    func = int(_call("cuKernelGetFunction", drv.cuKernelGetFunction, params.kern))
                out.append(func)
            elif kind == drv.CUgraphNodeType.CU_GRAPH_NODE_TYPE_GRAPH:
                walk(_call("cuGraphChildGraphNodeGetGraph", drv.cuGraphChildGraphNodeGetGraph, node))

    walk(drv.CUgraph(graph_handle))
    return out


def build_workload():
    import torch
    import torch.nn.functional as F
    import triton
    import triton.language as tl

    @triton.autotune(
        configs=[triton.Config({"BLOCK": b}, num_warps=4) for b in (256, 512, 1024)],
        key=["n"],
    )
    @triton.jit
    def scale_shift(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(y_ptr + offs, x * 1.5 + 0.25, mask=mask)

    @torch.compile(dynamic=False)
    def fused(h):
        return F.silu(h) * torch.sigmoid(h) + torch.tanh(h * 0.5)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(256, 1024, generator=g).cuda().to(torch.bfloat16)
    w = (torch.randn(1024, 1024, generator=g) / 32).cuda().to(torch.bfloat16)
    y = torch.empty(256 * 1024, device="cuda", dtype=torch.float32)

    def step():
        h = x @ w  # cuBLASLt
        p = torch.softmax(h.float(), dim=-1)  # ATen
        q = h.view(4, 64, 8, 128).transpose(1, 2)  # (batch 4, 8 heads, 64 tokens, 128)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True)  # flash / cuDNN
        z = fused(h)  # Inductor Triton
        n = p.numel()
        scale_shift[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](p, y, n)  # autotuned Triton
        return a.float().sum() + z.float().sum() + y.sum()

    return step


def phase_save(work: str) -> dict:
    work = Path(work)
    t_start = time.perf_counter()
    from foundry_core import cubin
    from foundry_core import images as kernel_images
    from foundry_core.errors import FoundryError
    from foundry_core.recorder import ImageRecorder

    recorder = ImageRecorder().start()  # before torch touches CUDA
    import torch

    step = build_workload()
    for _ in range(3):  # compile, autotune, warm up
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    res: dict = {"graph_output": float(out)}

    funcs = graph_kernel_functions(graph.raw_cuda_graph())
    res["kernel_nodes"] = len(funcs)
    res["distinct_functions"] = len(set(funcs))
    stats = recorder.stats()
    res["recorder"] = stats
    res["paired_modules"] = len(recorder.module_images())

    t = time.perf_counter()
    images = recorder.images()
    res["images_copy_seconds"] = time.perf_counter() - t
    res["images_unreadable"] = []
    for im in images:
        try:
            info = cubin.parse_image(im.data)
            if not info.complete:
                res["images_unreadable"].append(f"#{im.index}: {'; '.join(info.notes)}")
        except ValueError as err:
            res["images_unreadable"].append(f"#{im.index}: {err}")
    res["image_kinds"] = dict(Counter(_kind(im.data) for im in images))

    t = time.perf_counter()
    known = recorder.module_images()
    unresolved: list[str] = []
    try:
        refs = kernel_images.resolve_functions(funcs, images, known)
    except FoundryError as err:
        refs = []
        for f in dict.fromkeys(funcs):  # one by one, to count how many fail
            try:
                refs += kernel_images.resolve_functions([f], images, known)
            except FoundryError as e:
                unresolved.append(str(e))
        unresolved = unresolved or [str(err)]
    res["resolve_seconds"] = time.perf_counter() - t
    res["resolved_functions"] = len({r.handle for r in refs})
    res["unresolved"] = unresolved
    res["how"] = dict(Counter(r.how for r in {r.handle: r for r in refs}.values()))
    res["with_changed_attributes"] = sum(1 for r in {r.handle: r for r in refs}.values() if r.attributes)
    res["triton_autotuned"] = [(r.name, r.how) for r in {r.handle: r for r in refs}.values() if "scale_shift" in r.name]
    res["same_name_images"] = sum(1 for im in images if _has_kernel(im.data, "scale_shift"))

    # What cubin.py parsed vs what the driver reports for the same function.
    res["cubin_vs_driver"] = compare_cubin_with_driver(refs, images)

    # Write what an archive would hold.
    stored, functions = kernel_images.select_images(images, refs)
    res["stored_images"] = len(stored)
    res["stored_bytes"] = sum(len(s.data) for s in stored)
    res["stored_functions"] = len(functions)
    (work / "images").mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(stored):
        (work / "images" / f"{i:04d}.bin").write_bytes(s.data)
    identity = {}
    for r in refs:
        identity[(r.sha256, r.name)] = kernel_images._func_attrs(_drv(), _drv().CUfunction(r.handle),
                                                                  kernel_images.IDENTITY_ATTRIBUTES)
    records = [{"image": f.image, "name": f.name, "attributes": {str(k): v for k, v in f.attributes.items()},
                "identity": {str(k): v for k, v in identity[(stored[f.image].sha256, f.name)].items()}}
               for f in functions]
    (work / "functions.json").write_text(json.dumps(records))
    recorder.stop()
    res["save_total_seconds"] = time.perf_counter() - t_start
    return res


def _drv():
    from cuda.bindings import driver

    return driver


def _kind(data: bytes) -> str:
    from foundry_core import cubin

    try:
        info = cubin.parse_image(data)
    except ValueError:
        return "unreadable"
    if info.kind == "fatbin":
        parts = sorted({e.kind + (f"/{e.compression}" if e.compression else "") for e in info.entries})
        return f"fatbin({','.join(parts)})"
    return info.kind


def _has_kernel(data: bytes, fragment: str) -> bool:
    from foundry_core import cubin

    try:
        return any(fragment in k for k in cubin.parse_image(data).kernels)
    except ValueError:
        return False


def compare_cubin_with_driver(refs, images) -> dict:
    from foundry_core import cubin
    from foundry_core import images as kernel_images

    by_sha = {im.sha256: im for im in images}
    counts = Counter()
    examples = []
    for r in {r.handle: r for r in refs}.values():
        try:
            info = cubin.parse_image(by_sha[r.sha256].data).for_arch(kernel_images.device_arch())
        except ValueError:
            info = None
        k = info.kernels.get(r.name) if info else None
        if k is None or k.registers < 0:
            counts["not_parsed"] += 1
            continue
        a = kernel_images._func_attrs(_drv(), _drv().CUfunction(r.handle), kernel_images.IDENTITY_ATTRIBUTES)
        counts["compared"] += 1
        counts["regs_equal"] += a[kernel_images.ATTR_NUM_REGS] == k.registers
        diff = a[kernel_images.ATTR_SHARED_SIZE_BYTES] - k.shared_bytes
        counts["shared_equal"] += diff == 0
        counts[f"shared_driver_minus_cubin_{diff}"] += diff != 0
        counts["local_equals_frame"] += a[kernel_images.ATTR_LOCAL_SIZE_BYTES] == k.frame_bytes
        if len(examples) < 5 and (diff or a[kernel_images.ATTR_NUM_REGS] != k.registers):
            examples.append({"name": r.name[:80], "driver": a, "cubin": {"regs": k.registers, "shared": k.shared_bytes,
                                                                          "frame": k.frame_bytes,
                                                                          "const0": k.const0_bytes}})
    return {"counts": dict(counts), "examples": examples}


# ---------------------------------------------------------------------------------------------------------
# LOAD side (fresh process, no torch)
# ---------------------------------------------------------------------------------------------------------


def phase_load(work: str) -> dict:
    work = Path(work)
    from cuda.bindings import driver as drv

    from foundry_core import cubin
    from foundry_core import images as kernel_images
    from foundry_core.native import call as _call
    from foundry_core.schema import KernelFunction

    t0 = time.perf_counter()
    _call("cuInit", drv.cuInit, 0)
    dev = _call("cuDeviceGet", drv.cuDeviceGet, 0)
    ctx = _call("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain, dev)
    _call("cuCtxSetCurrent", drv.cuCtxSetCurrent, ctx)
    init_s = time.perf_counter() - t0
    images = [p.read_bytes() for p in sorted((work / "images").glob("*.bin"))]
    records = json.loads((work / "functions.json").read_text())
    functions = [KernelFunction(image=r["image"], name=r["name"],
                                attributes={int(k): v for k, v in r["attributes"].items()}) for r in records]
    t = time.perf_counter()
    modules = kernel_images.load_images(images)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    handles = kernel_images.get_functions(modules, functions, load=False)
    get_s = time.perf_counter() - t
    t = time.perf_counter()
    for h in handles:
        _call("cuFuncLoad", drv.cuFuncLoad, drv.CUfunction(h))
    func_load_s = time.perf_counter() - t
    bad = []
    for h, r in zip(handles, records):
        f = drv.CUfunction(h)
        name = cubin.decode_name(_call("cuFuncGetName", drv.cuFuncGetName, f))
        ident = kernel_images._func_attrs(drv, f, kernel_images.IDENTITY_ATTRIBUTES)
        applied = kernel_images._func_attrs(drv, f, [int(k) for k in r["attributes"]])
        if name != r["name"]:
            bad.append(f"{r['name'][:60]}: name {name[:60]}")
        if {str(k): v for k, v in ident.items()} != r["identity"]:
            bad.append(f"{r['name'][:60]}: identity {ident} != saved {r['identity']}")
        if {str(k): v for k, v in applied.items()} != r["attributes"]:
            bad.append(f"{r['name'][:60]}: attributes {applied} != saved {r['attributes']}")
    return {"mode": kernel_images.loading_mode(), "init_seconds": init_s, "load_images_seconds": load_s,
            "get_functions_seconds": get_s, "cuFuncLoad_seconds": func_load_s, "images": len(images),
            "functions": len(handles), "mismatches": bad[:20], "num_mismatches": len(bad)}


# ---------------------------------------------------------------------------------------------------------
# Error paths
# ---------------------------------------------------------------------------------------------------------


def phase_errors() -> dict:
    import ctypes
    import warnings

    from foundry_core.options import Options
    from foundry_core.recorder import ImageCaptureError, ImageRecorder, find_libcupti

    res = {}
    path = find_libcupti(Options.from_env().libcupti)
    cupti = ctypes.CDLL(path)
    holder = ctypes.c_void_p()
    cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)(lambda *a: None)
    rc = cupti.cuptiSubscribe(ctypes.byref(holder), cb, None)
    res["holder_subscribe_rc"] = rc
    try:
        ImageRecorder().start(path)
        res["busy_error"] = "started although CUPTI was held"
    except ImageCaptureError as err:
        res["busy_error"] = str(err)
    cupti.cuptiUnsubscribe(holder)

    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = ImageRecorder().start(path)
    res["late_warning"] = next((str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)), "")
    torch.softmax(torch.randn(8, 8, device="cuda"), -1)
    torch.cuda.synchronize()
    res["late_images"] = rec.stats()["images"]
    rec.stop()
    return res


# ---------------------------------------------------------------------------------------------------------


# -- the tests -----------------------------------------------------------------------------------------------------
def run_phase(phase, *args, log: Path, env: dict | None = None) -> dict:
    """A phase's result, or {"error", "stderr"} when its process failed."""
    ran = run_function(phase, *args, timeout=900, env=env, log=log)
    return ran.value if ran.value is not None else {"error": ran.status, "stderr": ran.output[-3000:]}


@pytest.fixture(scope="module")
def saved(module_dir, tmp_path_factory):
    """The SAVE process's result and its work folder (images and function records, for the LOAD processes)."""
    work = tmp_path_factory.mktemp("binaries-work")
    return work, run_phase(phase_save, work, log=module_dir / "save.log")


def test_save_records_and_resolves_every_kernel(saved, verdicts):
    _, save = saved
    verdicts.figures["save"] = save
    row = verdicts.row
    if "error" in save:
        row("save process", False, f"{save['error']}: {save['stderr'][-600:]}")
    else:
        r = save["recorder"]
        row("recorder: images recorded", r["images"] > 0 and not r["out_of_memory"],
            f"{r['images']} images, {r['bytes'] / 1e6:.1f} MB, {r['events']} module events, "
            f"{save['paired_modules']} CUmodule pairings; kinds {save['image_kinds']}")
        row("recorder: images readable by cubin.py", not save["images_unreadable"],
            f"{len(save['images_unreadable'])} not fully readable {save['images_unreadable'][:2]}")
        all_resolved = not save["unresolved"] and save["resolved_functions"] == save["distinct_functions"]
        row("graph kernel nodes resolved", all_resolved,
            f"{save['kernel_nodes']} nodes, {save['resolved_functions']}/{save['distinct_functions']} functions, "
            f"{len(save['unresolved'])} ambiguous/unresolved {[u[:160] for u in save['unresolved'][:2]]}")
        row("resolution methods", True, f"{save['how']} in {save['resolve_seconds']:.2f} s")
        row("autotuned Triton (same-name images)", bool(save["triton_autotuned"]) and not save["unresolved"],
            f"{save['same_name_images']} images define scale_shift; graph uses {save['triton_autotuned']}")
        cvd = save["cubin_vs_driver"]["counts"]
        row("cubin.py regs == driver NUM_REGS", cvd.get("regs_equal", 0) == cvd.get("compared", -1),
            f"{cvd} examples {save['cubin_vs_driver']['examples'][:2]}")
        row("functions with changed attributes", True, f"{save['with_changed_attributes']} (re-applied at LOAD)")
        row("archive selection", save["stored_images"] > 0,
            f"{save['stored_images']} images ({save['stored_bytes'] / 1e6:.1f} MB), "
            f"{save['stored_functions']} functions")
    verdicts.assert_passed()


@pytest.mark.parametrize("loading", ["LAZY", "EAGER"])
def test_load_in_a_fresh_process(saved, out_dir, verdicts, loading):
    work, save = saved
    if "error" in save:
        pytest.skip(f"the SAVE process failed: {save['error']}")
    ld = verdicts.figures["load"] = run_phase(phase_load, work, log=out_dir / "load.log",
                                              env={"CUDA_MODULE_LOADING": loading})
    label = f"LOAD fresh process, {loading}"
    if "error" in ld:
        verdicts.row(label, False, f"{ld['error']}: {ld['stderr'][-600:]}")
    else:
        verdicts.row(label, ld["num_mismatches"] == 0,
                     f"mode={ld['mode']} load_images {ld['load_images_seconds']:.3f} s + get_functions "
                     f"{ld['get_functions_seconds']:.3f} s + cuFuncLoad {ld['cuFuncLoad_seconds']:.3f} s "
                     f"for {ld['images']} images/"
                     f"{ld['functions']} functions; {ld['num_mismatches']} mismatches {ld['mismatches'][:2]}")
    verdicts.assert_passed()


def test_recorder_error_paths(out_dir, verdicts):
    errors = verdicts.figures["errors"] = run_phase(phase_errors, log=out_dir / "errors.log")
    if "error" in errors:
        verdicts.row("error paths", False, f"{errors['error']}: {errors['stderr'][-600:]}")
    else:
        busy = errors["busy_error"]
        verdicts.row("CUPTI held by another subscriber -> clear error", "already in use" in busy and "\n" not in busy,
                     busy[:200])
        verdicts.row("recorder started after CUDA init -> warning", "MISSED" in errors["late_warning"],
                     f"{errors['late_warning'][:120]}... (then recorded {errors['late_images']} images)")
    verdicts.assert_passed()
