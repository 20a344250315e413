"""GPU check for foundry_core (run on the H200 in one command): SAVE in one process, LOAD in a fresh one.

    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_core.py [--out DIR]

Workload: ATen elementwise + reductions, cuBLAS GEMMs, SDPA, a torch.compile'd function (Triton kernels) on a
second stream joined by events; several graphs (batch sizes) captured into one pool. Process B runs the same
initialisation, restores without any forward call, writes fresh random inputs and replays; outputs must equal
process A's bitwise for every graph and input set; so must process C's, which starts ``foundry_core.preload``
before importing torch and whose Session must adopt it. Also: base taken -> clear error; changed key -> refused;
host node -> refused at SAVE. Prints a verdict table last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def poison(outputs):
    for t in outputs:
        t.fill_(float("nan"))


def snapshot_outputs(outputs) -> list[str]:
    """sha256 of each output's bytes (bitwise comparison across processes)."""
    import hashlib

    import torch

    return [hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
            for t in outputs]


def run_save(archive: str, result: str) -> None:
    import foundry_core as fc

    t_open = time.perf_counter()
    s = fc.Session(archive, mode="save", key=KEY)
    s.open()
    import torch

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
            o = outs[f"bs{bs}"]
            poison(o)
            graphs[bs].replay()
            torch.cuda.synchronize()
            h1 = snapshot_outputs(o)
            poison(o)
            graphs[bs].replay()
            torch.cuda.synchronize()
            h2 = snapshot_outputs(o)
            hashes[f"{seed}/bs{bs}"] = h1
            determinism[f"{seed}/bs{bs}"] = h1 == h2
    Path(result).write_text(json.dumps({
        "hashes": hashes, "determinism": determinism, "capture_s": capture_s, "save_s": save_s,
        "save_stats": s.save_stats, "archive_bytes": os.path.getsize(path), "open_s": t0 - t_open,
    }))


def run_load(archive: str, result: str, early: bool = False) -> None:
    """Process B; ``early``: process C, which starts ``foundry_core.preload`` before importing torch."""
    import foundry_core as fc

    t0 = time.perf_counter()
    pre = fc.preload(archive, key=KEY, device=0) if early else None
    s = fc.Session(archive, mode="load", key=KEY)
    s.open()
    t_open = time.perf_counter() - t0
    import torch

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
            poison(rg.outputs)
            rg.replay()
            torch.cuda.synchronize()
            hashes[f"{seed}/bs{bs}"] = snapshot_outputs(rg.outputs)
    st = s.restore_stats
    Path(result).write_text(json.dumps({
        "hashes": hashes, "open_s": t_open, "restore_first_s": t_first, "restore_all_s": t_all,
        "stats": {k: v for k, v in vars(st).items() if k != "per_graph"},
        "early": None if pre is None else {"adopted": pre.adopted, "seconds": pre.finished_at - pre.started_at},
    }))


def run_taken(archive: str) -> None:
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
        print("RESULT no-error")
    except fc.FoundryError as e:
        print(f"RESULT {type(e).__name__}: {e}")


def run_wrong_key(archive: str) -> None:
    import foundry_core as fc

    try:
        fc.Session(archive, mode="load", key="some-other-model").open()
        print("RESULT no-error")
    except fc.FoundryError as e:
        print(f"RESULT {type(e).__name__}: {e}")


def run_host_node(archive: str) -> None:
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
        print("RESULT no-error")
    except fc.FoundryError as e:
        print(f"RESULT {type(e).__name__}: {e}")


def sub(mode: str, *args: str, timeout: int = 300) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, __file__, mode, *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="all",
                    choices=["all", "save", "load", "load-early", "taken", "wrong-key", "host-node"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/foundry-check"))
    a = ap.parse_args()
    if a.mode != "all":
        {"save": run_save, "load": run_load, "load-early": lambda *args: run_load(*args, early=True),
         "taken": run_taken, "wrong-key": run_wrong_key, "host-node": run_host_node}[a.mode](*a.args)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    archive = str(out / "core.foundry")
    rows = []
    log = open(out / "check_core.log", "w")

    def step(name, mode, *args):
        t = time.perf_counter()
        rc, text = sub(mode, *args)
        log.write(f"===== {name} rc={rc} {time.perf_counter() - t:.1f}s\n{text}\n")
        log.flush()
        return rc, text

    rc, text = step("save", "save", archive, str(out / "save.json"))
    if rc != 0:
        print(text[-4000:])
        rows.append(("SAVE (process A)", "FAIL", f"rc={rc}"))
    else:
        save = json.loads((out / "save.json").read_text())
        rows.append(("SAVE (process A)", "ok", f"capture {save['capture_s']:.2f}s, save {save['save_s']:.2f}s, "
                     f"archive {save['archive_bytes'] / 1e6:.1f} MB"))
        det = all(save["determinism"].values())
        rows.append(("captured graphs replay-to-replay deterministic", "ok" if det else "NOTE",
                     f"{sum(save['determinism'].values())}/{len(save['determinism'])}"))
        rc, text = step("load", "load", archive, str(out / "load.json"))
        if rc != 0:
            print(text[-4000:])
            rows.append(("LOAD (process B)", "FAIL", f"rc={rc}"))
        else:
            load = json.loads((out / "load.json").read_text())
            same = {k: load["hashes"][k] == save["hashes"][k] for k in save["hashes"]}
            rows.append(("LOAD bitwise == SAVE (graphs x input sets)", "PASS" if all(same.values()) else "FAIL",
                         f"{sum(same.values())}/{len(same)} equal"))
            st = load["stats"]
            rows.append(("LOAD timings", "info",
                         f"open {load['open_s']:.3f}s, first graph {load['restore_first_s']:.3f}s, "
                         f"all {load['restore_all_s']:.3f}s, images {st['images_seconds']:.3f}s, "
                         f"nodes {st['num_nodes']}, build {st['build_seconds']:.3f}s, "
                         f"inst {st['instantiate_seconds']:.3f}s"))
        rc, text = step("load-early", "load-early", archive, str(out / "load_early.json"))
        if rc != 0:
            print(text[-4000:])
            rows.append(("LOAD after foundry_core.preload (process C)", "FAIL", f"rc={rc}"))
        else:
            load = json.loads((out / "load_early.json").read_text())
            same = sum(load["hashes"][k] == save["hashes"][k] for k in save["hashes"])
            ok = same == len(save["hashes"]) and load["early"]["adopted"]
            rows.append(("LOAD after foundry_core.preload (process C)", "PASS" if ok else "FAIL",
                         f"{same}/{len(save['hashes'])} equal, adopted={load['early']['adopted']}, early load "
                         f"{load['early']['seconds']:.3f}s, open {load['open_s']:.3f}s, restore waited "
                         f"{load['stats']['preload_wait_seconds']:.3f}s"))
    for name, mode, expect in [("LOAD with arena base taken", "taken", "ArenaUnavailable"),
                               ("LOAD with changed key (fingerprint)", "wrong-key", "IncompatibleArchive"),
                               ("graph with a host node at SAVE", "host-node", "UnsupportedGraph")]:
        args = [archive] if mode != "host-node" else [str(out / "host.foundry")]
        rc, text = step(name, mode, *args)
        line = next((t for t in text.splitlines() if t.startswith("RESULT")),
                    f"rc={rc} " + text[-300:].replace("\n", " | "))
        rows.append((name, "PASS" if expect in line else "FAIL", line[7:200]))
    print("\n=== foundry_core GPU check ===")
    for name, verdict, detail in rows:
        print(f"{verdict:5} | {name:48} | {detail}")
    return 0 if all(verdict != "FAIL" for _, verdict, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
