"""GPU check of slots filled by the process that captured them, and of a template made from every rank's part.

    PYTHONPATH=$PWD python3 tests/gpu/check_slots_live.py [--ranks 2] [--out DIR]

Two rank processes (NCCL, several ranks may share GPU 0 with their own NCCL_HOSTID) SAVE a small graph whose
collectives (an all-reduce in place, an all-gather, a reduce-scatter) are slots: ``foundry_sglang.comm_patch``'s
``record_collective``, the way the SGLang plugin records SGLang's. Then each SAVE process fills its own graph with
its live communicator (``Session.fill_captured``) and replays it; rank 0 merges the parts into a rank template;
fresh LOAD processes restore from each part and from the template. Rows: SAVE's filled replay bitwise equal to
eager NCCL on fresh inputs (outputs poisoned first, replay twice), LOAD equal to SAVE, the template's deltas.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repo: tools.needs_gpu, also without PYTHONPATH

from tools.needs_gpu import exit_without_gpu  # noqa: E402

N, K = 64, 256  # rows (tokens) and hidden size of the toy layer


def digest(t) -> str:
    import torch

    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:16]


def build(rank: int):
    """Weights and static input, allocated in the same order in SAVE and LOAD (same arena addresses)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(1000 + rank)
    w = torch.randn(K, K, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.zeros(N, K, device="cuda", dtype=torch.bfloat16)
    return w, x


def forward(w, x, collective):
    """h = x @ w, all-reduced in place; gathered over ranks; reduce-scattered; returns three outputs."""
    import torch

    h = x @ w
    collective("all_reduce", h, h)
    world = int(os.environ["WORLD_SIZE"])
    gathered = torch.empty(world * N, K, device="cuda", dtype=h.dtype)
    collective("all_gather", h, gathered)
    scattered = torch.empty(N // world, K, device="cuda", dtype=h.dtype)
    collective("reduce_scatter", (h * 0.5).contiguous(), scattered)
    return h * 2, gathered, scattered


def eager(op, send, recv):
    import torch.distributed as dist

    if op == "all_reduce":
        dist.all_reduce(send)
    elif op == "all_gather":
        dist.all_gather_into_tensor(recv, send)
    else:
        dist.reduce_scatter_tensor(recv, send)


def fresh_inputs(x, step: int) -> None:
    import torch

    g = torch.Generator(device="cuda").manual_seed(50 + step)  # the same on every rank
    x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=g))


def run_rank(rank: int, world: int, mode: str, path: str, rank_arg: str, result: str) -> None:
    import torch
    import torch.distributed as dist

    import foundry_core as fc
    from foundry_sglang.comm_patch import SlotFiller, process_group_communicator, record_collective

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    dist.all_reduce(torch.zeros(1, device="cuda"))  # communicator up before the arena and the capture
    out: dict = {"rank": rank, "mode": mode}
    session = fc.Session(path, mode=mode, key="slots-live-probe", device=0,
                         rank=None if rank_arg == "none" else int(rank_arg))
    session.open()
    w, x = build(rank)
    filler = SlotFiller({"world": process_group_communicator()})
    if mode == "save":
        def slot(op, send, recv):
            record_collective(session, op, "world", send, recv)

        with session.capture_phase():
            for _ in range(2):
                forward(w, x, slot)
            torch.cuda.synchronize()
            graph = session.new_graph()
            stream = torch.cuda.Stream()
            with session.graph_capture(graph, stream):
                outs = forward(w, x, slot)
        session.add_graph("toy", graph, outs)
        session.save()
        t0 = time.perf_counter()
        out["filled"] = session.fill_captured(graph, filler, "toy")
        out["fill_s"] = round(time.perf_counter() - t0, 4)
        replay = graph.replay
    else:
        graphs = session.restore(slot_filler=filler, background=False)
        outs = graphs["toy"].outputs
        replay = graphs["toy"].replay
        out["restore"] = session.restore_stats.summary()
    results = []
    for step in range(3):
        fresh_inputs(x, step)
        for o in outs:
            o.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
        first = [digest(o) for o in outs]
        for o in outs:
            o.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
        again = [digest(o) for o in outs]
        session.close()  # eager reference allocates outside the arena
        ref = forward(w, x.clone(), eager)
        results.append({"graph": first, "again": again, "eager": [digest(r) for r in ref]})
    out["steps"] = results
    Path(result).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def spawn(world: int, mode: str, paths: list[str], ranks: list[str], tmp: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, results = [], []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                   NCCL_HOSTID=f"probe-rank{r}", NCCL_SOCKET_IFNAME="lo", NCCL_NVLS_ENABLE="0",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        res = tmp / f"{mode}-{r}-{Path(paths[r]).name}.json"
        results.append(res)
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world),
                                       "--mode", mode, "--path", paths[r], "--rank-arg", ranks[r],
                                       "--result", str(res)], env=env))
    for p in procs:
        p.wait(timeout=300)
    return [json.loads(r.read_text()) if r.exists() else {"error": f"rank exited {p.returncode}"}
            for r, p in zip(results, procs)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2, help="NCCL ranks, all on GPU 0 (2)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for slots_live.json")
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--rank-arg", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank is not None:
        run_rank(args.rank, args.world, args.mode, args.path, args.rank_arg, args.result)
        return 0
    exit_without_gpu("this check")
    from foundry_core.ranks import merge_rank_archives

    rows = []
    world = args.ranks
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        parts = [str(tmp / f"part{r}.foundry") for r in range(world)]
        save = spawn(world, "save", parts, ["none"] * world, tmp)
        ok = all("steps" in s and all(st["graph"] == st["eager"] == st["again"] for st in s["steps"]) for s in save)
        rows.append(("PASS" if ok else "FAIL", "SAVE process: its own graph, slots filled live, == eager NCCL",
                     "; ".join(f"rank {s.get('rank')}: filled {s.get('filled')} in {s.get('fill_s')} s "
                               f"{s.get('error', '')}" for s in save)))
        load = spawn(world, "load", parts, ["none"] * world, tmp)
        same = all("steps" in a and [st["graph"] for st in a["steps"]] == [st["graph"] for st in s["steps"]]
                   for a, s in zip(load, save))
        rows.append(("PASS" if same else "FAIL", "LOAD of each rank's part == SAVE (3 input sets, 3 outputs)",
                     "; ".join(a.get("restore", a.get("error", ""))[:160] for a in load)))
        template = str(tmp / "template.foundry")
        try:
            report = merge_rank_archives(parts, template)
            rows.append(("PASS", "rank template from the parts (no noise capture)", report.summary()))
            tload = spawn(world, "load", [template] * world, [str(r) for r in range(world)], tmp)
            same = all("steps" in a and [st["graph"] for st in a["steps"]] == [st["graph"] for st in s["steps"]]
                       for a, s in zip(tload, save))
            rows.append(("PASS" if same else "FAIL", "LOAD of the template on every rank == SAVE",
                         "; ".join(a.get("restore", a.get("error", ""))[:160] for a in tload)))
        except Exception as err:
            rows.append(("FAIL", "rank template from the parts", f"{type(err).__name__}: {err}"[:300]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "slots_live.json").write_text(json.dumps({"rows": rows, "save": save}, indent=1))
    print("\n| verdict | check | detail |\n|---|---|---|")
    for verdict, name, detail in rows:
        print(f"| {verdict} | {name} | {detail} |")
    return 0 if all(v != "FAIL" for v, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
