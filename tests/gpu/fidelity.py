"""Shared parts of the fidelity tests (test_fidelity_*.py): the toy workload, how a child reports, and the
runner that starts every SAVE and LOAD child in a fresh process.

Every fidelity check runs SAVE and LOAD in fresh processes (with time limits) and compares outputs bitwise
(outputs poisoned before each replay). Each check is independent: one failure does not hide the others. A child
writes its result as JSON to the path it is given (``write``/``outcome``); the runner reads it back, or reports how
the child failed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from gpu.bitwise import digest, poison
from gpu.fresh import run_function
from gpu.verdicts import INFO

KEY = "check-fidelity-v1"
HIDDEN = 1024
TOY_BS = [8, 2]
SEEDS = [11, 22, 33]


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
    "gemm": the bf16 GEMM toy of the first GPU run (diagnostic); "gemm-nn1" / "gemm-tn1": one GEMM of it,
    x @ w (NN) or F.linear (TN, the layout of model code)."""
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
                if variant.startswith("gemm"):
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
    width = HIDDEN * 4 if variant.startswith("gemm") else HIDDEN
    dt = torch.bfloat16 if variant.startswith("gemm") else torch.float32
    static_in = {bs: torch.zeros(bs, width, dtype=dt, device=device) for bs in TOY_BS}

    def forward(bs):
        x = static_in[bs]
        if variant == "gemm-nn1":
            return (x @ t["w0"]).float().sum(-1)
        if variant == "gemm-tn1":
            return torch.nn.functional.linear(x[:, : HIDDEN * 2], t["w0"]).float().sum(-1)
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


def replay_restored_toy(restored, static_in) -> tuple[dict, dict]:
    """Replay each restored toy graph on every seed's inputs (outputs poisoned first): hashes and first values."""
    hashes, values = {}, {}
    for seed in SEEDS:
        toy_inputs(static_in, seed)
        for bs in TOY_BS:
            rg = restored[f"decode_bs{bs}"]
            poison(rg.outputs)
            rg.replay()
            hashes[f"{seed}/bs{bs}"] = digest(rg.outputs)
            values[f"{seed}/bs{bs}"] = [float(v) for v in rg.outputs.flatten()[:16].tolist()]
    return hashes, values


class Runner:
    """Starts a check's children, each in a fresh process on one GPU (round robin unless given), with its log and
    its JSON result in ``out``."""

    def __init__(self, out: Path, gpus: int):
        self.out = out
        self.gpus = max(gpus, 1)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.devices = visible.split(",") if visible else [str(i) for i in range(self.gpus)]
        self._next = 0

    def child(self, tag: str, func, *args: str, timeout: int = 240, gpu: int | None = None,
              env: dict | None = None) -> dict:
        """Run ``func(args[0], result, *args[1:])`` (``env``: extra environment); returns its JSON result (or
        {"error": ...} describing how it failed)."""
        result = self.out / f"{tag}.json"
        result.unlink(missing_ok=True)
        if gpu is None:
            gpu, self._next = self._next % self.gpus, self._next + 1
        env = dict(env or {}, CUDA_VISIBLE_DEVICES=self.devices[gpu % len(self.devices)])
        call = [args[0], str(result), *args[1:]] if args else [str(result)]
        ran = run_function(func, *call, timeout=timeout, env=env, log=self.out / f"{tag}.log")
        if result.exists():
            return json.loads(result.read_text())
        return {"error": f"child {tag} {ran.why()}", "crashed": True}


def report(verdicts, rows) -> None:
    """Add a check's rows, (name, verdict, detail) with "info" for INFO, to the test's table."""
    for name, verdict, detail in rows:
        verdicts.row(name, INFO if verdict == "info" else verdict, detail)
