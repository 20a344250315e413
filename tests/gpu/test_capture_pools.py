"""Where do the allocations of a Foundry SAVE graph capture land? (one GPU, seconds)

Why: ``Session.graph_capture`` used to re-register the session's all-streams route *after* ``capture_begin`` so
that, on a PyTorch that searches its routing list oldest-first, the capture's own pool would win for the capture
stream. PyTorch searches that list newest-first since pytorch/pytorch#168382 (nested MemPools); there the
re-registered route won instead, the capture allocated from the warm-up pool, and SAVE snapshotted every live graph
output as a "warm-up buffer" that LOAD wrote back on restore()'s path (the suspected cause of the built-in engine's
seconds-long LOAD in check_comm_patch (b)/(c) on 2026-11-30). The session now steps its route aside for the
capture; this test shows where a capture's allocations land and what an archive would write back.

Rows:
  capture output   a real SAVE Session: the pool of a tensor allocated inside ``Session.graph_capture``
                   (FAIL unless the graph pool);
  archive          what its LOAD would write back (``foundry_core.save.snapshot_facts``; FAIL if the output is
                   inside a snapshot);
  routing order    (INFO) two all-streams routes, A then B: which pool a fresh allocation comes from.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gpu.verdicts import Verdicts

pytestmark = pytest.mark.gpu


def pool_of(address: int):
    """segment_pool_id of the allocated block at ``address`` (None if PyTorch holds no such block)."""
    import torch

    for seg in torch.cuda.memory_snapshot():
        for blk in seg["blocks"]:
            if int(blk["address"]) == address and blk["state"] == "active_allocated":
                return tuple(seg.get("segment_pool_id", ()))
    return None


def capture_output_pool(path: Path) -> dict:
    """SAVE one small graph through a real Session; where its output landed, and the archive's facts."""
    import torch

    import foundry_core as fc
    from foundry_core.archive import Archive
    from foundry_core.save import snapshot_facts

    s = fc.Session(path, mode="save", key="check-capture-pools", progress=False)
    s.open()  # before any CUDA work: the recorder sees every module load
    try:
        x = torch.randn(64, 1024, device="cuda")
        w = torch.randn(1024, 1024, device="cuda")
        with s.capture_phase():
            s.capture("probe", lambda: torch.relu(x @ w) * 2.0, warmups=2, stream=torch.cuda.Stream())
        out = s.captured[-1].outputs
        pools = {tuple(p.id): name for name, p in s._pools.items()}
        where = pool_of(out.data_ptr())
        res = {"output_pool": pools.get(where, f"not an arena pool: {where}"), "output_bytes": out.numel() * 4}
        try:
            s.save()
            with Archive.open(path) as a:
                res["facts"] = snapshot_facts(a.manifest)
        except Exception as e:  # reported as a row; the output's pool is known already
            res["save_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        return res
    finally:
        s.close()


def routing_order() -> str:
    """'newest-first' or 'oldest-first': which of two all-streams routes PyTorch uses for a fresh allocation."""
    import torch

    dev = torch.cuda.current_device()
    a, b = torch.cuda.MemPool(), torch.cuda.MemPool()
    torch._C._cuda_beginAllocateToPool(dev, a.id)
    torch._C._cuda_beginAllocateToPool(dev, b.id)
    try:
        t = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
    finally:
        for p in (b, a):
            torch._C._cuda_endAllocateToPool(dev, p.id)
            torch._C._cuda_releasePool(dev, p.id)
    where = pool_of(t.data_ptr())
    del t
    return {tuple(b.id): "newest-first", tuple(a.id): "oldest-first"}.get(where, f"neither ({where})")


def probe(out: str) -> dict:
    """The three rows, in this (fresh) process: the Session opens before any CUDA work."""
    verdicts = Verdicts("capture pools")
    row = verdicts.row
    details = verdicts.figures
    try:
        details["capture"] = cap = capture_output_pool(Path(out) / "probe.foundry")
        row("capture output", "PASS" if cap["output_pool"] == "graphs" else "FAIL",
            f"a tensor allocated inside Session.graph_capture came from the {cap['output_pool']!r} pool "
            "(expected 'graphs')")
        f = cap.get("facts")
        if f is None:
            row("archive", "FAIL", f"SAVE failed: {cap.get('save_error')}")
        else:
            row("archive", "PASS" if not f["outputs_in_snapshots"] else "FAIL",
                f"{f['snapshots']} snapshots, {f['snapshot_bytes']} B ({f['snapshot_bytes_by_note']}); graph "
                f"outputs inside snapshots {f['outputs_in_snapshots']}/{f['outputs']} "
                f"({f['output_bytes_in_snapshots']} B); capture region {f['capture_region_bytes']} B")
    except Exception as e:  # the probe reports; it does not stop before the routing-order row
        row("capture output", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    import torch

    details["torch"] = torch.__version__
    details["routing_order"] = order = routing_order()
    row("routing order", "INFO", f"torch {torch.__version__}: PyTorch searches its allocation routes {order} "
        "(Session.graph_capture assumes oldest-first)")
    return {"rows": verdicts.rows, "figures": details}


def test_capture_allocates_from_the_graph_pool(out_dir, run_check, verdicts):
    run_check(probe, out_dir, timeout=300)
    verdicts.assert_passed()
