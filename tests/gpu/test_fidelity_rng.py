"""Fidelity of random numbers inside graphs: a graph with dropout and torch.randn; the restored stream equals the
live one over 5 replays, and the default generator's offset advances alike.
"""
from __future__ import annotations

import pytest

from gpu.bitwise import digest, poison
from gpu.fidelity import HIDDEN, KEY, Runner, outcome

pytestmark = pytest.mark.gpu


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


def check_rng(r: Runner) -> list[tuple[str, str, str]]:
    archive = str(r.out / "rng.foundry")
    save = r.child("rng-save", child_rng_save, archive, gpu=1 % r.gpus)
    if save.get("error"):
        return [("RNG: dropout + randn, 5 replays", "FAIL", "SAVE: " + save["error"][:400])]
    load = r.child("rng-load", child_rng_load, archive, gpu=1 % r.gpus)
    if load.get("error"):
        return [("RNG: dropout + randn, 5 replays", "FAIL", "LOAD: " + load["error"][:400])]
    live, rest = save["stream"], load["stream"]
    varies = len(set(live)) == len(live)
    good = live == rest and varies and save["again"] == live and save["offset_after"] == load["offset_after"]
    return [("RNG: dropout + randn, restored == live (5 replays)", "PASS" if good else "FAIL",
             f"{sum(a == b for a, b in zip(live, rest))}/{len(live)} replays equal (2 graphs x 5); live draws all "
             f"distinct {varies}; generator offset after: live {save['offset_after']} / restored "
             f"{load['offset_after']}; state {save['rng']}")]


def test_random_numbers_restore(fidelity, verdicts):
    fidelity(check_rng)
    verdicts.assert_passed()
