"""Fidelity: the arena layout LOAD checks before it restores (toy workload, SAVE and LOAD in fresh processes).

* same-size reorder after the weights -> refused naming the divergent allocation; the graph backend in auto mode
  falls back to live capture (outputs still == SAVE); 1 GiB extra allocation -> refused; small tensors swapped
  inside one segment -> refused; the normal LOAD order restores bitwise; weights made by another thread during
  init are traced and restore bitwise;
* LOAD cost of the layout check for a 10,000-record trace.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import pytest

from gpu.bitwise import digest, poison
from gpu.fidelity import KEY, SEEDS, TOY_BS, Runner, outcome, replay_restored_toy, toy_init, toy_inputs, write

pytestmark = pytest.mark.gpu


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
        hashes, values = replay_restored_toy(restored, static_in)
        st = s.restore_stats
        return {"hashes": hashes, "values": values, "layout_ms": st.layout_seconds * 1e3,
                "layout_records": st.layout_records,
                "blocks_ms": st.blocks_seconds * 1e3, "blocks": st.layout_blocks}

    outcome(run, result)


def child_toy_auto(archive, result, order):
    """The built-in engine's / plugin's graph backend in auto mode: a LOAD problem falls back to live capture."""
    import torch

    import foundry_core as fc
    from foundry_sglang.builtin.backend import FoundryGraphBackend

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


def check_layout(r: Runner) -> list[tuple[str, str, str]]:
    archive = str(r.out / "toy.foundry")
    rows = []
    with cf.ThreadPoolExecutor(2) as ex:
        saving = ex.submit(r.child, "toy-save", child_toy_save, archive, "plain", gpu=0)
        thread = ex.submit(check_thread_toy, r)
        save = saving.result()
        if save.get("error"):
            return [("layout: SAVE of the toy workload", "FAIL", save["error"][:300]), *thread.result()]
        with cf.ThreadPoolExecutor(5) as ex2:
            orders = ("save", "reorder", "shift", "swap-small")
            fut = {o: ex2.submit(r.child, f"toy-load-{o}", child_toy_load, archive, o, "plain", gpu=0) for o in orders}
            auto = ex2.submit(r.child, "toy-auto-reorder", child_toy_auto, archive, "reorder", gpu=0)
            res = {o: f.result() for o, f in fut.items()}
            auto = auto.result()
        thread_rows = thread.result()
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
    return rows + thread_rows


def check_thread_toy(r: Runner) -> list[tuple[str, str, str]]:
    """Weights allocated by another thread during init: routed to the arena (outside it, SAVE would refuse them
    as foreign tensors), covered by the trace, restored bitwise."""
    archive = str(r.out / "toy-thread.foundry")
    save = r.child("toy-thread-save", child_toy_save, archive, "thread", gpu=1 % r.gpus)
    if save.get("error"):
        return [("layout: weights made in another thread", "FAIL", "SAVE: " + save["error"][:300])]
    load = r.child("toy-thread-load", child_toy_load, archive, "save", "thread", gpu=1 % r.gpus)
    if load.get("error"):
        return [("layout: weights made in another thread", "FAIL", "LOAD: " + load["error"][:300])]
    eq = sum(load["hashes"][k] == v for k, v in save["hashes"].items())
    good = eq == len(save["hashes"]) and save["trace_records"] >= 4
    return [("layout: weights made in another thread", "PASS" if good else "FAIL",
             f"trace {save['trace_records']} records, LOAD {eq}/{len(save['hashes'])} bitwise")]


def check_cost(r: Runner) -> list[tuple[str, str, str]]:
    res = r.child("cost", child_cost, "10000", timeout=240)
    if res.get("error"):
        return [("layout: LOAD check cost, 10,000 records", "FAIL", res["error"])]
    good = res["check_ms_median"] <= 1.0 and res["records"] >= 10000 and "allocation #" in res["mismatch"]
    return [("layout: LOAD check cost, 10,000 records", "PASS" if good else "FAIL",
             f"{res['records']} segment records: read back + compare {res['check_ms_median']:.3f} ms median "
             f"({res['check_ms_max']:.3f} max); decode at open {res['decode_ms']:.3f} ms; "
             f"{res['manifest_bytes'] / 1e3:.1f} kB in the manifest; live-block check "
             f"{res['blocks_ms_median']:.1f} ms for {res['blocks']} blocks")]


def test_layout_is_checked_at_load(fidelity, verdicts):
    fidelity(check_layout)
    verdicts.assert_passed()


def test_layout_check_cost(fidelity, verdicts):
    fidelity(check_cost)
    verdicts.assert_passed()
