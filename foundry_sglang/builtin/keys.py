"""The built-in engine's archive rule: which archive one rank's graph backend uses, and how.

One place for it: the graph backend (:mod:`.backend`) and the early load (:mod:`.early`) both ask
:func:`archive_target`. Pure: needs neither torch nor the archive.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from foundry_sglang.engine.config import EngineArgs
from foundry_sglang.graphs.keys import RankLayout, archive_key
from foundry_sglang.graphs.settings import FoundryMode

__all__ = ["ArchiveTarget", "archive_target"]


@dataclass(frozen=True)
class ArchiveTarget:
    """The archive one rank's graph backend uses, and how (``foundry_core.Session`` arguments)."""

    path: Path
    key: str
    mode: FoundryMode  # what the session is asked to do (a TP/EP rank always loads its layout's template)
    device: int  # CUDA ordinal
    rank: Optional[int]  # the rank of a rank template; None for a single-rank archive


def archive_target(args: EngineArgs, rank: int = 0) -> ArchiveTarget:
    """Rank ``rank``'s archive under ``--foundry-archive`` (a directory), keyed by everything that changes the
    decode graphs. Pure: needs neither torch nor the archive."""
    config = args.foundry_config()
    layout = RankLayout(tp_size=args.tp, tp_rank=rank if args.tp > 1 else 0,
                        ep_size=args.ep, ep_rank=rank if args.ep > 1 else 0)
    material = {
        "model": args.model, "dtype": str(args.dtype), "page_size": args.page_size,
        "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
        "cuda_graph_bs": list(args.graph_batch_sizes()), "num_kv_pages": args.num_kv_pages, "seed": args.seed,
    }
    world = args.world_size
    # A TP/EP layout has ONE rank template (no rank in key or path) that every rank restores; its ranks never
    # SAVE in place (their graphs hold live NCCL state): rank 0 saves the template on one GPU first
    # (FoundryGraphBackend.prepare_layout), then every rank loads it, or every rank captures live.
    key = archive_key("builtin", args.model, material, layout, per_rank=world == 1)
    return ArchiveTarget(path=key.path(config.archive_dir), key=key.key,
                         mode=config.mode if world == 1 else FoundryMode.LOAD, device=args.gpu_of(rank),
                         rank=rank if world > 1 else None)
