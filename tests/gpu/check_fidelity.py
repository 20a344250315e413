"""GPU check for issue 11 (never silent garbage, third-party model code, random numbers inside graphs).

    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_fidelity.py [--out DIR] [--only NAME,...] [--jobs N]

Every check runs SAVE and LOAD in fresh processes (children of this script, with timeouts) and compares outputs
bitwise (outputs poisoned before each replay). Rows:

* layout: same-size reorder after the weights -> refused naming the divergent allocation; the graph backend in
  auto mode falls back to live capture (outputs still == SAVE); 1 GiB extra allocation -> refused; the normal
  LOAD order restores bitwise; LOAD cost of the layout check for a 10,000-record trace;
* third-party model code: transformers' own Qwen3 and Qwen3-MoE modeling classes (small random-weight configs),
  static-cache decode graphs over several batch sizes, two successive steps per input set;
* RNG: a graph with dropout and torch.randn; restored stream == live stream over 5 replays;
* pointer check: a real out-of-arena pointer is refused (tensor made before open(); foreign memory as a whole
  parameter), a stale foreign value in a struct's unused bytes does not block SAVE and restores bitwise;
* tests/gpu/check_core.py still passes.

Each check is independent (one failure does not hide the others). Details go to DIR (default $OUT).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KEY = "check-fidelity-v1"
HIDDEN = 1024
TOY_BS = [8, 2]
QWEN_BS = [8, 4, 1]
QWEN_CACHE_LEN = 64
SEEDS = [11, 22, 33]


# =====================================================================================================================
# helpers used by the child processes
# =====================================================================================================================
def leaves(out):
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in leaves(o)]
    return []


def poison(out) -> None:
    for t in leaves(out):
        t.fill_(float("nan") if t.is_floating_point() else -7)


def digest(out) -> str:
    import torch

    torch.cuda.synchronize()
    h = hashlib.sha256()
    for t in leaves(out):
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write(result: str, data: dict) -> None:
    Path(result).write_text(json.dumps(data, default=str))


def outcome(fn, result: str, **extra) -> None:
    """Run fn; record its return value or the FoundryError it raised (type and message)."""
    import foundry_core as fc

    try:
        data = fn() or {}
        data.setdefault("error", None)
    except fc.FoundryError as e:
        data = {"error": f"{type(e).__name__}: {e}"}
    data.update(extra)
    write(result, data)


# -- toy workload for the layout checks ------------------------------------------------------------------------
def toy_init(session, order: str, device: int, variant: str = "plain"):
    """Weights (3 x 16 MiB segments), a 2 MiB buffer (a 20 MiB segment) and two small tensors sharing a 2 MiB
    segment. "save" puts the buffer first, "reorder" after the weights (same total), "shift" adds 1 GiB first,
    "swap-small" swaps the two small tensors (same segments, other places inside one).
    variant "plain": elementwise/reductions only; "thread": the same with the weights made in another thread;
    "gemm": the bf16 GEMM toy of the first GPU run (diagnostic)."""
    import torch

    def label(name):
        return session.label(name) if session is not None and session.arena is not None else _null()

    g = torch.Generator().manual_seed(5)
    t = {}
    if order == "shift":
        with label("extra 1 GiB"):
            t["extra"] = torch.empty(1 << 30, dtype=torch.uint8, device=device)

    def buffer():
        with label("buffer"):
            t["buf"] = (torch.arange(1 << 19, dtype=torch.float32, device=device) % 97) / 97.0  # 2 MiB

    def weights():
        with label("weights"):
            for i in range(3):
                if variant == "gemm":
                    t[f"w{i}"] = (torch.randn(HIDDEN * 4, HIDDEN * 2, generator=g) / 64).to(device, torch.bfloat16)
                else:
                    t[f"w{i}"] = (torch.randn(HIDDEN * 4, HIDDEN, generator=g) / 8).to(device)

    def small(names):
        with label("small tensors"):
            for name in names:
                n = {"s1": 1 << 16, "s2": 1 << 17}[name]  # 256 KiB and 512 KiB: one small-pool segment
                t[name] = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(device)

    if order == "reorder":
        weights()
        buffer()
    elif variant == "thread":  # the weights come from a thread the application starts during init
        import threading

        buffer()
        worker = threading.Thread(target=weights)
        worker.start()
        worker.join()
    else:
        buffer()
        weights()
    small(["s2", "s1"] if order == "swap-small" else ["s1", "s2"])
    width = HIDDEN * 4 if variant == "gemm" else HIDDEN
    dt = torch.bfloat16 if variant == "gemm" else torch.float32
    static_in = {bs: torch.zeros(bs, width, dtype=dt, device=device) for bs in TOY_BS}

    def forward(bs):
        x = static_in[bs]
        if variant == "gemm":
            h = torch.relu(x @ t["w0"]) + t["buf"][: HIDDEN * 2].to(torch.bfloat16)
            h = (h @ t["w1"].T) * t["buf"][HIDDEN * 4: HIDDEN * 8].to(torch.bfloat16)
            return (h @ t["w2"]).float().sum(-1)
        h = x[:, None, :] * t["w0"][None, :64] + t["w1"][None, 64:128]
        h = torch.tanh(h) * t["w2"][None, -64:]
        return h.sum(-1) + t["buf"][:64] + t["s1"][:64] + t["s2"][-64:]

    return static_in, forward


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def toy_inputs(static_in, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    for bs in sorted(static_in):
        static_in[bs].copy_(torch.randn(static_in[bs].shape, generator=g).to(torch.bfloat16))


def child_toy_save(archive, result, variant="plain"):
    import foundry_core as fc

    s = fc.Session(archive, mode="save", key=KEY, progress=False).open()
    static_in, forward = toy_init(s, "save", s.device, variant)
    graphs = {}
    with s.capture_phase():
        for bs in TOY_BS:
            graphs[bs] = s.capture(f"decode_bs{bs}", lambda bs=bs: forward(bs))
    outs = {g.key: g.outputs for g in s.captured}
    try:
        s.save()
    except fc.FoundryError as e:
        write(result, {"error": f"{type(e).__name__}: {e}"})
        return
    hashes, again, values = {}, {}, {}
    for seed in SEEDS:
        toy_inputs(static_in, seed)
        for bs in TOY_BS:
            o = outs[f"decode_bs{bs}"]
            for into in (hashes, again):  # twice: is the live graph itself replay-to-replay deterministic?
                poison(o)
                graphs[bs].replay()
                into[f"{seed}/bs{bs}"] = digest(o)
            values[f"{seed}/bs{bs}"] = [float(v) for v in o.flatten()[:16].tolist()]
    write(result, {"hashes": hashes, "trace_records": s.arena.trace_len(), "error": None,
                   "deterministic": hashes == again, "values": values,
                   "stale_words": s.save_stats.get("stale_words") or 0})


def child_toy_load(archive, result, order, variant="plain"):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=KEY, progress=False).open()
        static_in, _ = toy_init(s, order, s.device, variant)
        restored = s.restore()
        hashes, values = {}, {}
        for seed in SEEDS:
            toy_inputs(static_in, seed)
            for bs in TOY_BS:
                rg = restored[f"decode_bs{bs}"]
                poison(rg.outputs)
                rg.replay()
                hashes[f"{seed}/bs{bs}"] = digest(rg.outputs)
                values[f"{seed}/bs{bs}"] = [float(v) for v in rg.outputs.flatten()[:16].tolist()]
        st = s.restore_stats
        return {"hashes": hashes, "values": values, "layout_ms": st.layout_seconds * 1e3,
                "layout_records": st.layout_records,
                "blocks_ms": st.blocks_seconds * 1e3, "blocks": st.layout_blocks}

    outcome(run, result)


def child_toy_auto(archive, result, order):
    """The built-in engine's / plugin's graph backend in auto mode: a LOAD problem falls back to live capture."""
    import torch

    import foundry_core as fc
    from foundry_sglang.graph_backend import FoundryGraphBackend

    backend = FoundryGraphBackend(fc.Session(archive, mode="auto", key=KEY, progress=False))
    backend.before_allocations()
    mode = backend.session.mode
    static_in, forward = toy_init(backend.session, order, backend.session.device)
    with backend.capture_session(torch.cuda.Stream()):
        for bs in TOY_BS:
            backend.capture_one(bs, lambda bs=bs: forward(bs))
    hashes = {}
    for seed in SEEDS:
        toy_inputs(static_in, seed)
        for bs in TOY_BS:
            o = backend._outputs[bs]
            poison(o)
            backend.replay(bs)
            hashes[f"{seed}/bs{bs}"] = digest(o)
    write(result, {"hashes": hashes, "session_mode": mode, "fallback_reason": backend.fallback_reason, "error": None})


def child_cost(records, result):
    """LOAD-side cost of the layout check on a real arena trace of ``records`` segment allocations."""
    import torch

    import foundry_core as fc
    from foundry_core import layout

    s = fc.Session(str(Path(result).with_suffix(".unused")), mode="save", key=KEY, record_images=False).open()
    keep = []
    t0 = time.perf_counter()
    while s.arena.trace_len() < int(records):
        keep.append(torch.empty(1 << 20, dtype=torch.uint8, device=s.device))  # small pool: 2 blocks / 2 MiB segment
    alloc_s = time.perf_counter() - t0
    rows = s.arena.trace()
    enc = layout.encode(rows, len(rows))
    t = time.perf_counter()
    dec = layout.decode(enc)
    decode_ms = (time.perf_counter() - t) * 1e3
    times = []
    for _ in range(30):
        t = time.perf_counter()
        live = s.arena.trace()  # what restore() does: read this process's trace back, compare
        layout.check(enc, dec, live, s.arena.granularity)
        times.append(time.perf_counter() - t)
    times.sort()
    bad = rows.copy()
    bad[len(bad) // 2]["granules"] += 1
    try:
        layout.check(enc, dec, bad, s.arena.granularity)
        msg = "no error"
    except fc.FoundryError as e:
        msg = str(e)
    blocks = layout.live_blocks(s._pools["init"], s.arena.base)
    enc = layout.encode(rows, len(rows), blocks=blocks)
    saved_blocks = layout.decode_blocks(enc)
    block_times = []
    for _ in range(5):
        t = time.perf_counter()
        layout.check_blocks(enc, saved_blocks, layout.live_blocks(s._pools["init"], s.arena.base), rows)
        block_times.append(time.perf_counter() - t)
    write(result, {"records": len(rows), "check_ms_median": times[len(times) // 2] * 1e3,
                   "check_ms_max": times[-1] * 1e3, "decode_ms": decode_ms, "alloc_s": alloc_s,
                   "manifest_bytes": len(enc.records), "mismatch": msg[:300], "blocks": len(blocks),
                   "blocks_ms_median": sorted(block_times)[2] * 1e3})
    del keep


# -- transformers' Qwen3 / Qwen3-MoE --------------------------------------------------------------------------------
def qwen_init(kind: str, device: int):
    import torch
    import transformers

    common = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "dense":
        cfg = transformers.Qwen3Config(intermediate_size=512, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                          norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
        cfg._experts_implementation = "batched_mm"  # index-select of expert weights: no host syncs, capturable
    cfg._attn_implementation = "sdpa"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    torch.manual_seed(1234)
    model = cls(cfg).to(device=device, dtype=torch.bfloat16).eval()
    caches, ids, pos, cpos, mask = {}, {}, {}, {}, {}
    for bs in QWEN_BS:
        cache = transformers.StaticCache(config=cfg, max_cache_len=QWEN_CACHE_LEN)
        if hasattr(cache, "early_initialization"):
            cache.early_initialization(batch_size=bs, num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                       dtype=torch.bfloat16, device=device)
        caches[bs] = cache
        ids[bs] = torch.zeros(bs, 1, dtype=torch.long, device=device)
        pos[bs] = torch.zeros(bs, 1, dtype=torch.long, device=device)
        cpos[bs] = torch.zeros(1, dtype=torch.long, device=device)
        mask[bs] = torch.zeros(bs, 1, 1, QWEN_CACHE_LEN, dtype=torch.bool, device=device)
        mask[bs][..., 0] = True

    def forward(bs):
        with torch.no_grad():
            out = model(input_ids=ids[bs], position_ids=pos[bs], cache_position=cpos[bs], attention_mask=mask[bs],
                        past_key_values=caches[bs], use_cache=True)
        return out.logits

    def set_step(bs, tokens, p):
        ids[bs].copy_(tokens.view(bs, 1))
        pos[bs].fill_(p)
        cpos[bs].fill_(p)
        mask[bs].zero_()
        mask[bs][..., : p + 1] = True

    def reset_cache(bs):
        for layer in caches[bs].layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    t.zero_()

    return forward, set_step, reset_cache, model


def qwen_steps(kind, run_graph, set_step, reset_cache):
    """Per input set and batch size: two successive decode steps (the second reads the KV the first wrote)."""
    import torch

    hashes = {}
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        p = 3 + seed % 17
        for bs in QWEN_BS:
            reset_cache(bs)
            tokens = torch.randint(0, 512, (bs,), generator=g)
            for step in range(2):
                set_step(bs, tokens.cuda(), p + step)
                logits = run_graph(bs)
                hashes[f"{seed}/bs{bs}/step{step}"] = digest(logits)
                tokens = logits[:, -1].float().argmax(-1).cpu()
    return hashes


def child_qwen_save(archive, result, kind):
    import torch

    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="save", key=f"{KEY}-{kind}", progress=False).open()
        forward, set_step, reset_cache, _ = qwen_init(kind, s.device)
        graphs = {}
        t0 = time.perf_counter()
        with s.capture_phase():
            for bs in QWEN_BS:
                graphs[bs] = s.capture(f"decode_bs{bs}", lambda bs=bs: forward(bs))
        capture_s = time.perf_counter() - t0
        outs = {g.key: g.outputs for g in s.captured}
        s.save()

        def run_graph(bs):
            poison(outs[f"decode_bs{bs}"])
            graphs[bs].replay()
            return outs[f"decode_bs{bs}"]

        hashes = qwen_steps(kind, run_graph, set_step, reset_cache)
        deterministic = True  # the same step replayed twice on the same state gives the same logits
        for bs in QWEN_BS:
            reset_cache(bs)
            set_step(bs, torch.arange(bs).cuda(), 4)
            first = digest(run_graph(bs))
            deterministic &= first == digest(run_graph(bs))
        return {"hashes": hashes, "deterministic": deterministic, "capture_s": capture_s,
                "stale_words": s.save_stats.get("stale_words") or 0, "archive_mb": os.path.getsize(archive) / 1e6}

    outcome(run, result)


def child_qwen_load(archive, result, kind):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=f"{KEY}-{kind}", progress=False).open()
        _, set_step, reset_cache, _ = qwen_init(kind, s.device)
        restored = s.restore()

        def run_graph(bs):
            rg = restored[f"decode_bs{bs}"]
            poison(rg.outputs)
            rg.replay()
            return rg.outputs

        hashes = qwen_steps(kind, run_graph, set_step, reset_cache)
        st = s.restore_stats
        return {"hashes": hashes, "nodes": st.num_nodes, "layout_ms": st.layout_seconds * 1e3,
                "layout_records": st.layout_records}

    outcome(run, result)


# -- random numbers inside graphs -------------------------------------------------------------------------------
RNG_BS = [8, 2]


def rng_init(device):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(9)
    w = (torch.randn(HIDDEN, HIDDEN, generator=g) / 32).to(device)
    x = {bs: torch.randn(bs, HIDDEN, generator=g).to(device) for bs in RNG_BS}

    def forward(bs):
        h = F.dropout(x[bs] @ w, p=0.3, training=True)
        n = torch.randn(bs, HIDDEN, device=device)
        return h + n, n

    return forward


def rng_stream(run_graph):
    import torch

    torch.cuda.manual_seed(2024)
    out = []
    for _ in range(5):
        for bs in RNG_BS:
            out.append(digest(run_graph(bs)))
    return out


def child_rng_save(archive, result):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="save", key=f"{KEY}-rng", progress=False).open()
        forward = rng_init(s.device)
        graphs = {}
        with s.capture_phase():
            for bs in RNG_BS:
                graphs[bs] = s.capture(f"rng_bs{bs}", lambda bs=bs: forward(bs))
        outs = {g.key: g.outputs for g in s.captured}
        s.save()

        def run_graph(bs):
            poison(outs[f"rng_bs{bs}"])
            graphs[bs].replay()
            return outs[f"rng_bs{bs}"]

        stream = rng_stream(run_graph)
        import torch

        from foundry_core.archive import Archive

        m = Archive.open(archive).manifest
        rng = {g.key: [(hex(r.seed_address), hex(r.offset_address), r.increment) for r in g.rng] for g in m.graphs}
        return {"stream": stream, "again": rng_stream(run_graph), "rng": rng,
                "offset_after": torch.cuda.default_generators[s.device].get_offset()}

    outcome(run, result)


def child_rng_load(archive, result):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=f"{KEY}-rng", progress=False).open()
        forward = rng_init(s.device)  # keeps the weights and inputs the graphs read alive (as SAVE does)
        restored = s.restore()

        def run_graph(bs):
            rg = restored[f"rng_bs{bs}"]
            poison(rg.outputs)
            rg.replay()
            return rg.outputs

        stream = rng_stream(run_graph)
        import torch

        del forward
        return {"stream": stream, "offset_after": torch.cuda.default_generators[s.device].get_offset()}

    outcome(run, result)


# -- pointer check ------------------------------------------------------------------------------------------------
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


CHILDREN = {
    "toy-save": child_toy_save, "toy-load": child_toy_load, "toy-auto": child_toy_auto, "cost": child_cost,
    "qwen-save": child_qwen_save, "qwen-load": child_qwen_load, "rng-save": child_rng_save,
    "rng-load": child_rng_load, "ptr": child_ptr, "ptr-load": child_ptr_load,
}


# =====================================================================================================================
# orchestration
# =====================================================================================================================
class Runner:
    def __init__(self, out: Path, gpus: int):
        self.out = out
        self.gpus = max(gpus, 1)
        self._next = 0

    def child(self, tag: str, role: str, *args: str, timeout: int = 240, gpu: int | None = None) -> dict:
        """Run one child; returns its JSON result (or {"error": ...} describing how it failed)."""
        result = self.out / f"{tag}.json"
        result.unlink(missing_ok=True)
        if gpu is None:
            gpu, self._next = self._next % self.gpus, self._next + 1
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", role, *args, str(result)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        (self.out / f"{tag}.log").write_text(f"rc={rc} {time.perf_counter() - t:.1f}s\n{text}")
        if result.exists():
            return json.loads(result.read_text())
        last = [ln for ln in str(text).strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"child {role} rc={rc}: {last[0][:300]}", "crashed": True}


def check_layout(r: Runner) -> list[tuple[str, str, str]]:
    archive = str(r.out / "toy.foundry")
    rows = []
    with cf.ThreadPoolExecutor(3) as ex:
        saving = ex.submit(r.child, "toy-save", "toy-save", archive, "plain", gpu=0)
        gemm = ex.submit(check_gemm_toy, r)
        thread = ex.submit(check_thread_toy, r)
        save = saving.result()
        if save.get("error"):
            return [("layout: SAVE of the toy workload", "FAIL", save["error"][:300]), *thread.result(),
                    *gemm.result()]
        with cf.ThreadPoolExecutor(5) as ex2:
            orders = ("save", "reorder", "shift", "swap-small")
            fut = {o: ex2.submit(r.child, f"toy-load-{o}", "toy-load", archive, o, "plain", gpu=0) for o in orders}
            auto = ex2.submit(r.child, "toy-auto-reorder", "toy-auto", archive, "reorder", gpu=0)
            res = {o: f.result() for o, f in fut.items()}
            auto = auto.result()
        gemm_rows = thread.result() + gemm.result()
    ok = res["save"]
    same = not ok.get("error") and ok["hashes"] == save["hashes"]
    rows.append(("layout: LOAD, same order -> bitwise", "PASS" if same else "FAIL",
                 ok.get("error") or f"{sum(ok['hashes'][k] == v for k, v in save['hashes'].items())}/"
                 f"{len(save['hashes'])} equal; checks: segments {ok['layout_ms']:.3f} ms ({ok['layout_records']} "
                 f"records), live blocks {ok['blocks_ms']:.3f} ms ({ok['blocks']} blocks)"))
    e = res["reorder"].get("error") or ""
    good = e.startswith("LayoutMismatch") and "allocation #" in e and '"buffer"' in e
    rows.append(("layout: reorder after weights -> refused, named", "PASS" if good else "FAIL",
                 e[:400] or "NOT refused"))
    reason = auto.get("fallback_reason") or ""
    fell_back = (not auto.get("error") and auto.get("session_mode") == "load" and "arena layout differs" in reason
                 and auto["hashes"] == save["hashes"])
    rows.append(("layout: auto (graph backend) falls back live", "PASS" if fell_back else "FAIL",
                 auto.get("error")
                 or f"live graphs == SAVE: {auto['hashes'] == save['hashes']}; reason: {reason[:160]}"))
    e = res["shift"].get("error") or ""
    rows.append(("layout: 1 GiB shift -> refused", "PASS" if e.startswith("LayoutMismatch") else "FAIL",
                 e[:300] or "NOT refused"))
    e = res["swap-small"].get("error") or ""
    rows.append(("layout: small tensors swapped in a segment -> refused",
                 "PASS" if e.startswith("LayoutMismatch") and "inside its segments" in e else "FAIL",
                 e[:300] or "NOT refused"))
    return rows + gemm_rows


def check_thread_toy(r: Runner) -> list[tuple[str, str, str]]:
    """Weights allocated by another thread during init: routed to the arena (outside it, SAVE would refuse them
    as foreign tensors), covered by the trace, restored bitwise."""
    archive = str(r.out / "toy-thread.foundry")
    save = r.child("toy-thread-save", "toy-save", archive, "thread", gpu=1 % r.gpus)
    if save.get("error"):
        return [("layout: weights made in another thread", "FAIL", "SAVE: " + save["error"][:300])]
    load = r.child("toy-thread-load", "toy-load", archive, "save", "thread", gpu=1 % r.gpus)
    if load.get("error"):
        return [("layout: weights made in another thread", "FAIL", "LOAD: " + load["error"][:300])]
    eq = sum(load["hashes"][k] == v for k, v in save["hashes"].items())
    good = eq == len(save["hashes"]) and save["trace_records"] >= 4
    return [("layout: weights made in another thread", "PASS" if good else "FAIL",
             f"trace {save['trace_records']} records, LOAD {eq}/{len(save['hashes'])} bitwise")]


def check_gemm_toy(r: Runner) -> list[tuple[str, str, str]]:
    """Diagnostic: the bf16 GEMM toy whose restore differed from SAVE in the first GPU run of this branch."""
    archive = str(r.out / "toy-gemm.foundry")
    save = r.child("toy-gemm-save", "toy-save", archive, "gemm", gpu=1 % r.gpus)
    if save.get("error"):
        return [("diagnostic: bf16 GEMM toy (bs 8/2, K 4096)", "info", "SAVE: " + save["error"][:300])]
    load = r.child("toy-gemm-load", "toy-load", archive, "save", "gemm", gpu=1 % r.gpus)
    if load.get("error"):
        return [("diagnostic: bf16 GEMM toy (bs 8/2, K 4096)", "FAIL", "LOAD: " + load["error"][:300])]
    eq = sum(load["hashes"][k] == v for k, v in save["hashes"].items())
    diff = max((abs(a - b) for k in save["values"] for a, b in zip(save["values"][k], load["values"][k])),
               default=0.0)
    detail = (f"saved ({save['stale_words']:.0f} stale words), LOAD {eq}/{len(save['hashes'])} bitwise, max |diff| "
              f"{diff:.3g}; live graph replay-to-replay deterministic: {save['deterministic']}; first values SAVE "
              f"{save['values'][next(iter(save['values']))][:3]} LOAD {load['values'][next(iter(load['values']))][:3]}")
    if not save["deterministic"]:  # the kernel itself differs between replays: bitwise equality cannot be asked
        return [("diagnostic: bf16 GEMM toy (bs 8/2, K 4096)", "info", detail)]
    return [("diagnostic: bf16 GEMM toy (bs 8/2, K 4096)", "PASS" if eq == len(save["hashes"]) else "FAIL", detail)]


def check_cost(r: Runner) -> list[tuple[str, str, str]]:
    res = r.child("cost", "cost", "10000", timeout=240)
    if res.get("error"):
        return [("layout: LOAD check cost, 10,000 records", "FAIL", res["error"])]
    good = res["check_ms_median"] <= 1.0 and res["records"] >= 10000 and "allocation #" in res["mismatch"]
    return [("layout: LOAD check cost, 10,000 records", "PASS" if good else "FAIL",
             f"{res['records']} segment records: read back + compare {res['check_ms_median']:.3f} ms median "
             f"({res['check_ms_max']:.3f} max); decode at open {res['decode_ms']:.3f} ms; "
             f"{res['manifest_bytes'] / 1e3:.1f} kB in the manifest; live-block check "
             f"{res['blocks_ms_median']:.1f} ms for {res['blocks']} blocks")]


def check_qwen(r: Runner, kind: str) -> list[tuple[str, str, str]]:
    name = f"transformers Qwen3{'-MoE' if kind == 'moe' else ''} decode, bs {QWEN_BS}"
    archive = str(r.out / f"qwen-{kind}.foundry")
    gpu = 0 if kind == "dense" else 1 % r.gpus
    save = r.child(f"qwen-{kind}-save", "qwen-save", archive, kind, timeout=300, gpu=gpu)
    if save.get("error"):
        return [(name, "FAIL", "SAVE: " + save["error"][:400])]
    load = r.child(f"qwen-{kind}-load", "qwen-load", archive, kind, timeout=300, gpu=gpu)
    if load.get("error"):
        return [(name, "FAIL", "LOAD: " + load["error"][:400])]
    eq = sum(load["hashes"][k] == v for k, v in save["hashes"].items())
    good = eq == len(save["hashes"]) and len(save["hashes"]) == len(SEEDS) * len(QWEN_BS) * 2
    return [(name, "PASS" if good else "FAIL",
             f"{eq}/{len(save['hashes'])} (input sets x bs x 2 steps) bitwise; SAVE deterministic "
             f"{save['deterministic']}; {load['nodes']} nodes; stale words ignored {save['stale_words']:.0f}; "
             f"layout check {load['layout_ms']:.3f} ms / {load['layout_records']} records")]


def check_rng(r: Runner) -> list[tuple[str, str, str]]:
    archive = str(r.out / "rng.foundry")
    save = r.child("rng-save", "rng-save", archive, gpu=1 % r.gpus)
    if save.get("error"):
        return [("RNG: dropout + randn, 5 replays", "FAIL", "SAVE: " + save["error"][:400])]
    load = r.child("rng-load", "rng-load", archive, gpu=1 % r.gpus)
    if load.get("error"):
        return [("RNG: dropout + randn, 5 replays", "FAIL", "LOAD: " + load["error"][:400])]
    live, rest = save["stream"], load["stream"]
    varies = len(set(live)) == len(live)
    good = live == rest and varies and save["again"] == live and save["offset_after"] == load["offset_after"]
    return [("RNG: dropout + randn, restored == live (5 replays)", "PASS" if good else "FAIL",
             f"{sum(a == b for a, b in zip(live, rest))}/{len(live)} replays equal (2 graphs x 5); live draws all "
             f"distinct {varies}; generator offset after: live {save['offset_after']} / restored "
             f"{load['offset_after']}; state {save['rng']}")]


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
        futs = [ex.submit(r.child, f"ptr-{c}", "ptr", str(r.out / f"ptr-{c}.foundry"), c, str(cubin or "-"))
                for c, _, _ in cases]
        stale = (ex.submit(r.child, "ptr-stale", "ptr", str(r.out / "ptr-stale.foundry"), "stale-tensorinfo",
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
    load = r.child("ptr-stale-load", "ptr-load", str(r.out / "ptr-stale.foundry"), str(cubin))
    good = not load.get("error") and load["hashes"] == save["hashes"] and save["stale_words"] >= 1
    rows.append(("pointer: stale in TensorInfo unused slots -> saved", "PASS" if good else "FAIL",
                 load.get("error") or f"saved ({save['stale_words']:.0f} stale word ignored), LOAD "
                 f"{sum(a == b for a, b in zip(load['hashes'], save['hashes']))}/{len(save['hashes'])} bitwise"))
    return rows


def check_core(r: Runner) -> list[tuple[str, str, str]]:
    out = r.out / "core"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(1 % r.gpus))
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu/check_core.py"), "--out", str(out)], env=env,
                              capture_output=True, text=True, timeout=420)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        return [("tests/gpu/check_core.py", "FAIL", f"timeout after {e.timeout}s")]
    (r.out / "check_core.out").write_text(text)
    table = [ln for ln in text.splitlines() if " | " in ln]
    verdicts = [ln.split("|")[0].strip() for ln in table]
    good = proc.returncode == 0 and verdicts.count("PASS") >= 4 and "FAIL" not in verdicts
    return [("tests/gpu/check_core.py still passes", "PASS" if good else "FAIL",
             f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL: " + " / ".join(
                 ln.split("|")[1].strip() + "=" + ln.split("|")[0].strip() for ln in table if ln))]


CHECKS = {  # longest first: they all run at once by default
    "core": check_core, "pointers": check_pointers, "qwen-moe": lambda r: check_qwen(r, "moe"),
    "qwen-dense": lambda r: check_qwen(r, "dense"), "layout": check_layout, "rng": check_rng, "cost": check_cost,
}
ORDER = ["layout", "cost", "qwen-dense", "qwen-moe", "rng", "pointers", "core"]  # rows in the table


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        import logging

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        CHILDREN[sys.argv[2]](*_child_args(sys.argv[3:]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/foundry-fidelity"), help="folder for logs/archives")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--jobs", type=int, default=len(CHECKS), help="checks run at the same time")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        gpus = len([ln for ln in listing.splitlines() if ln.startswith("GPU")])
    except OSError:
        gpus = 1
    r = Runner(out, gpus)
    names = [n for n in (a.only.split(",") if a.only else CHECKS) if n]
    t0 = time.perf_counter()
    results: dict[str, list] = {}

    def run(name):
        t = time.perf_counter()
        try:
            rows = CHECKS[name](r)
        except Exception as e:  # a broken check prints its row; the others still run
            (out / f"{name}.error").write_text(traceback.format_exc())
            rows = [(name, "FAIL", f"{type(e).__name__}: {e}"[:300])]
        print(f"[{time.perf_counter() - t0:6.1f}s] {name} done in {time.perf_counter() - t:.1f}s", flush=True)
        return rows

    with cf.ThreadPoolExecutor(max(a.jobs, 1)) as ex:
        futures = {n: ex.submit(run, n) for n in names}
        for n in names:
            results[n] = futures[n].result()
    rows = [row for n in sorted(names, key=ORDER.index) for row in results[n]]
    (out / "verdicts.json").write_text(json.dumps(rows, indent=1))
    print(f"\n=== foundry fidelity GPU check ({time.perf_counter() - t0:.0f}s, {gpus} GPU(s)) ===")
    for name, verdict, detail in rows:
        print(f"{verdict:4} | {name:52} | {detail}")
    sys.exit(0 if all(v in ("PASS", "info") for _, v, _ in rows) else 1)


def _child_args(args: list[str]) -> list[str]:
    """Children take their positional args with the result path last; reorder to the functions' signatures."""
    *rest, result = args
    if not rest:
        return [result]
    return [rest[0], result, *rest[1:]]


if __name__ == "__main__":
    main()
