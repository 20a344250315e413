"""foundry_core on the GPU: SAVE in one process, LOAD in fresh ones, outputs bitwise equal; the refusals.

Workload: ATen elementwise + reductions, cuBLAS GEMMs, SDPA, a torch.compile'd function (Triton kernels) on a
second stream joined by events; several graphs (batch sizes) captured into one pool. Process B runs the same
initialisation, restores without any forward call, writes fresh random inputs and replays; outputs must equal
process A's bitwise for every graph and input set; so must process C's, which starts ``foundry_core.preload``
before importing torch and whose Session must adopt it. Also: base taken -> clear error; changed key -> refused;
host node -> refused at SAVE.
"""
from __future__ import annotations

import os
import time

import pytest

from gpu.bitwise import equal_count, replay_digest, replay_twice
from gpu.fresh import run_function

pytestmark = pytest.mark.gpu

BATCH_SIZES = [64, 8, 1]  # captured largest first, one pool
HIDDEN = 1024
SEEDS = [11, 22, 33]
KEY = "check-core-v1"


def build_workload(device: int):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(1234)
    dt = torch.bfloat16
    w1 = (torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5).to(device=device, dtype=dt)
    w2 = (torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5).to(device=device, dtype=dt)
    gamma = torch.randn(HIDDEN, generator=g).to(device=device, dtype=dt)
    static_in = {bs: torch.zeros(bs, HIDDEN, device=device, dtype=dt) for bs in BATCH_SIZES}

    @torch.compile(dynamic=False)
    def side(h):
        return torch.sigmoid(h) * h + torch.tanh(h * 0.5)

    def forward(bs: int):
        x = static_in[bs]
        h = F.gelu(x @ w1)  # cuBLAS + ATen elementwise
        h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True) + 1e-5) * gamma  # reductions
        q = h.view(bs, 4, 4, 64).transpose(1, 2)  # (bs, 4 heads, 4 tokens, 64)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(bs, HIDDEN)  # SDPA
        main = torch.cuda.current_stream()
        s2 = side_stream
        s2.wait_stream(main)
        with torch.cuda.stream(s2):
            z = side(h)  # Triton kernels on a second stream
        main.wait_stream(s2)
        out = (a + z) @ w2
        return out, out.float().sum(-1)

    side_stream = torch.cuda.Stream(device)
    return static_in, forward


def fill_inputs(static_in, seed: int):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    for bs in sorted(static_in):
        static_in[bs].copy_(torch.randn(bs, HIDDEN, generator=g).to(torch.bfloat16))


def run_save(archive: str) -> dict:
    """Process A: capture every batch size into one pool, save, replay each graph twice per input set."""
    import foundry_core as fc

    t_open = time.perf_counter()
    s = fc.Session(archive, mode="save", key=KEY)
    s.open()
    device = s.device
    static_in, forward = build_workload(device)
    graphs = {}
    t0 = time.perf_counter()
    with s.capture_phase():
        for bs in BATCH_SIZES:
            graphs[bs] = s.capture(f"bs{bs}", lambda bs=bs: forward(bs))
    capture_s = time.perf_counter() - t0
    outs = {g.key: g.outputs for g in s.captured}
    t1 = time.perf_counter()
    path = s.save()
    save_s = time.perf_counter() - t1
    hashes, determinism = {}, {}
    for seed in SEEDS:
        fill_inputs(static_in, seed)
        for bs in BATCH_SIZES:
            h1, h2 = replay_twice(graphs[bs].replay, outs[f"bs{bs}"])
            hashes[f"{seed}/bs{bs}"] = h1
            determinism[f"{seed}/bs{bs}"] = h1 == h2
    return {
        "hashes": hashes, "determinism": determinism, "capture_s": capture_s, "save_s": save_s,
        "save_stats": s.save_stats, "archive_bytes": os.path.getsize(path), "open_s": t0 - t_open,
    }


def run_load(archive: str, early: bool = False) -> dict:
    """Process B; ``early``: process C, which starts ``foundry_core.preload`` before importing torch."""
    import foundry_core as fc

    t0 = time.perf_counter()
    pre = fc.preload(archive, key=KEY, device=0) if early else None
    s = fc.Session(archive, mode="load", key=KEY)
    s.open()
    t_open = time.perf_counter() - t0
    static_in, forward = build_workload(s.device)  # same init; forward is never called
    t1 = time.perf_counter()
    restored = s.restore()
    t_first = time.perf_counter() - t1
    for rg in restored.values():
        rg.wait()
    t_all = time.perf_counter() - t1
    hashes = {}
    for seed in SEEDS:
        fill_inputs(static_in, seed)
        for bs in BATCH_SIZES:
            rg = restored[f"bs{bs}"]
            hashes[f"{seed}/bs{bs}"] = replay_digest(rg.replay, rg.outputs)
    st = s.restore_stats
    return {
        "hashes": hashes, "open_s": t_open, "restore_first_s": t_first, "restore_all_s": t_all,
        "stats": {k: v for k, v in vars(st).items() if k != "per_graph"},
        "early": None if pre is None else {"adopted": pre.adopted, "seconds": pre.finished_at - pre.started_at},
    }


def run_taken(archive: str) -> str:
    from cuda.bindings import driver as drv

    import foundry_core as fc
    from foundry_core.archive import Archive

    arena = Archive.open(archive).manifest.arena
    drv.cuInit(0)
    err, dev = drv.cuDeviceGet(0)
    err, ctx = drv.cuDevicePrimaryCtxRetain(dev)
    drv.cuCtxSetCurrent(ctx)
    err, ptr = drv.cuMemAddressReserve(arena.size, 0, arena.base, 0)
    print(f"pre-reserved {int(ptr):#x} ({err})")
    try:
        fc.Session(archive, mode="load", key=KEY).open()
        return "no-error"
    except fc.FoundryError as e:
        return f"{type(e).__name__}: {e}"


def run_wrong_key(archive: str) -> str:
    import foundry_core as fc

    try:
        fc.Session(archive, mode="load", key="some-other-model").open()
        return "no-error"
    except fc.FoundryError as e:
        return f"{type(e).__name__}: {e}"


def run_host_node(archive: str) -> str:
    import ctypes

    import foundry_core as fc

    s = fc.Session(archive, mode="save", key=KEY)
    s.open()
    import torch
    from cuda.bindings import driver as drv

    x = torch.ones(16, device=s.device)
    CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    cb = CB(lambda _: None)
    fn = drv.CUhostFn(ctypes.cast(cb, ctypes.c_void_p).value)

    def work():
        y = x * 2
        drv.cuLaunchHostFunc(drv.CUstream(torch.cuda.current_stream().cuda_stream), fn, 0)
        return y + 1

    try:
        with s.capture_phase():
            s.capture("host", work, warmups=1)
        s.save()
        return "no-error"
    except fc.FoundryError as e:
        return f"{type(e).__name__}: {e}"


# -- the tests: each process is a fresh one ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(module_dir):
    """Process A's run (SAVE of core.foundry), shared by the tests below."""
    archive = module_dir / "core.foundry"
    return archive, run_function(run_save, archive, timeout=300, log=module_dir / "save.log")


def _need_save(saved):
    archive, ran = saved
    if ran.value is None:
        pytest.skip(f"SAVE (process A) failed: {ran.why()}")
    return archive, ran.value


def test_save(saved, verdicts):
    _, ran = saved
    if ran.value is None:
        print(ran.output[-4000:])
        verdicts.row("SAVE (process A)", False, ran.status)
    else:
        save = verdicts.figures["save"] = ran.value
        verdicts.row("SAVE (process A)", True, f"capture {save['capture_s']:.2f}s, save {save['save_s']:.2f}s, "
                     f"archive {save['archive_bytes'] / 1e6:.1f} MB")
        det = all(save["determinism"].values())
        verdicts.row("captured graphs replay-to-replay deterministic", True if det else None,
                     f"{sum(save['determinism'].values())}/{len(save['determinism'])}")
    verdicts.assert_passed()


def test_load_equals_save(saved, out_dir, verdicts):
    archive, save = _need_save(saved)
    ran = run_function(run_load, archive, timeout=300, log=out_dir / "load.log")
    if ran.value is None:
        print(ran.output[-4000:])
        verdicts.row("LOAD (process B)", False, ran.status)
    else:
        load = verdicts.figures["load"] = ran.value
        same = equal_count(save["hashes"], load["hashes"])
        verdicts.row("LOAD bitwise == SAVE (graphs x input sets)", same == len(save["hashes"]),
                     f"{same}/{len(save['hashes'])} equal")
        st = load["stats"]
        verdicts.row("LOAD timings", None,
                     f"open {load['open_s']:.3f}s, first graph {load['restore_first_s']:.3f}s, "
                     f"all {load['restore_all_s']:.3f}s, images {st['images_seconds']:.3f}s, "
                     f"nodes {st['num_nodes']}, build {st['build_seconds']:.3f}s, "
                     f"inst {st['instantiate_seconds']:.3f}s")
    verdicts.assert_passed()


def test_load_adopts_the_early_load(saved, out_dir, verdicts):
    archive, save = _need_save(saved)
    ran = run_function(run_load, archive, True, timeout=300, log=out_dir / "load_early.log")
    name = "LOAD after foundry_core.preload (process C)"
    if ran.value is None:
        print(ran.output[-4000:])
        verdicts.row(name, False, ran.status)
    else:
        load = verdicts.figures["load_early"] = ran.value
        same = equal_count(save["hashes"], load["hashes"])
        ok = same == len(save["hashes"]) and load["early"]["adopted"]
        verdicts.row(name, ok, f"{same}/{len(save['hashes'])} equal, adopted={load['early']['adopted']}, early load "
                     f"{load['early']['seconds']:.3f}s, open {load['open_s']:.3f}s, restore waited "
                     f"{load['stats']['preload_wait_seconds']:.3f}s")
    verdicts.assert_passed()


@pytest.mark.parametrize("name, run, expect", [
    ("LOAD with arena base taken", run_taken, "ArenaUnavailable"),
    ("LOAD with changed key (fingerprint)", run_wrong_key, "IncompatibleArchive"),
], ids=["base-taken", "changed-key"])
def test_load_is_refused(saved, out_dir, verdicts, name, run, expect):
    archive, _ = _need_save(saved)
    ran = run_function(run, archive, timeout=300, log=out_dir / "child.log")
    result = ran.value or ran.why()
    verdicts.row(name, expect in result, result[:193])
    verdicts.assert_passed()


def test_host_node_is_refused_at_save(out_dir, verdicts):
    ran = run_function(run_host_node, out_dir / "host.foundry", timeout=300, log=out_dir / "child.log")
    result = ran.value or ran.why()
    verdicts.row("graph with a host node at SAVE", "UnsupportedGraph" in result, result[:193])
    verdicts.assert_passed()
