"""SAVE of a built-in engine TP/EP layout on one GPU: capture virtual ranks, then merge into one rank template.

``save_template(args, path, key)`` runs one short-lived process per capture, one after another on one GPU (a fresh
process gives each virtual rank the same arena layout a real rank will have at LOAD; started alike, without
address-space randomisation and with one hash seed, so that argument padding holds the same stale bytes wherever the
capture does the same): rank 0, rank 0 again (its differences from the first are capture noise) and the last rank.
The engine keeps rank-dependent values in device memory, so the last rank differs from rank 0 only in capture noise
(uninitialised padding in torch's kernel-argument structs, at offsets that are noisy for that kernel:
``foundry_core.ranks``) and the ranks between are derived: three captures whatever the rank count; where the last
rank differs beyond the noise, every other rank is captured too. Each process builds the model with its rank's
shards, turns collectives into slot placeholders (:mod:`.collectives`) and writes a per-rank archive;
``foundry_core.ranks.merge_rank_archives`` compares the ranks with rank 0 and writes one archive: rank 0's graphs
plus per-rank byte deltas (normally none: rank-dependent values such as the vocabulary window and the first local
expert live in device memory, not in kernel arguments).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from foundry_core.archive import Archive
from foundry_core.errors import FoundryError
from foundry_core.ranks import NotDerivable, merge_rank_archives
from foundry_sglang.proc import alike_process

__all__ = ["save_template", "TemplateReport"]

log = logging.getLogger("foundry_sglang.comm_patch")


@dataclasses.dataclass
class TemplateReport:
    path: Path
    world_size: int
    capture_seconds: dict = dataclasses.field(default_factory=dict)  # "rank0", "rank0-noise", "rank1"... -> s
    derived: list = dataclasses.field(default_factory=list)  # ranks not captured (empty deltas)
    merge_seconds: float = 0.0
    total_seconds: float = 0.0
    summary: str = ""
    by_kernel: dict = dataclasses.field(default_factory=dict)  # where the rank deltas fall (kernel -> bytes)


def save_template(args, path: str | os.PathLike, key: str, gpu: Optional[int] = None, noise: bool = True,
                  timeout: float = 1800.0) -> TemplateReport:
    """Capture every rank of ``args``'s layout on GPU ``gpu`` (default: rank 0's) and write the template."""
    t0 = time.perf_counter()
    path = Path(path)
    world = args.world_size
    gpu = args.gpu_of(0) if gpu is None else gpu
    report = TemplateReport(path=path, world_size=world)
    with tempfile.TemporaryDirectory(prefix="foundry-template-", dir=path.parent) as tmp:
        parts: dict[str, Path] = {}

        def capture(name: str, rank: int) -> None:
            nonlocal args
            out = Path(tmp) / f"{name}.foundry"
            ts = time.perf_counter()
            cmd = [sys.executable, "-m", "foundry_sglang.builtin.virtual_rank", "--rank", str(rank), "--gpu", str(gpu),
                   "--key", key, "--out", str(out), "--args", json.dumps(args.to_dict())]
            log.info("foundry: capturing virtual %s of %d on cuda:%d", name, world, gpu)
            cmd, env = alike_process(cmd)  # the same stale bytes in every capture: less noise to mask
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  env=env)
            if proc.returncode != 0 or not out.exists():
                tail = (proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
                raise FoundryError(f"capturing virtual {name} of the tp={args.tp} ep={args.ep} layout failed: "
                                   f"{tail[0]}")
            report.capture_seconds[name] = time.perf_counter() - ts
            parts[name] = out
            if name == "rank0" and args.num_kv_pages is None:
                with Archive.open(out) as a:  # every later rank must size its KV cache the same way
                    pages = a.manifest.extra.get("num_kv_pages")
                args = dataclasses.replace(args, num_kv_pages=int(pages)) if pages else args

        def merge():
            ranks = {int(n[4:]): f for n, f in parts.items() if n != "rank0-noise"}
            return merge_rank_archives(ranks, path, noise=parts.get("rank0-noise"), world_size=world,
                                       layout={"tp": str(args.tp), "ep": str(args.ep), "world_size": str(world)})

        for name, rank in [("rank0", 0)] + ([("rank0-noise", 0)] if noise else []) + (
                [(f"rank{world - 1}", world - 1)] if world > 1 else []):
            capture(name, rank)
        tm = time.perf_counter()
        try:
            merged = merge()
        except NotDerivable as err:
            log.info("foundry: %s", err)
            for rank in range(1, world - 1):
                capture(f"rank{rank}", rank)
            tm = time.perf_counter()
            merged = merge()
        report.merge_seconds = time.perf_counter() - tm
        report.derived = list(merged.derived)
    report.summary = merged.summary()
    report.by_kernel = merged.by_kernel
    report.total_seconds = time.perf_counter() - t0
    log.info("foundry: template %s saved in %.1f s (%s)", path, report.total_seconds, report.summary)
    return report
