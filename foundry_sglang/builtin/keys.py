"""The built-in engine's archive rule: which archive one rank's graph backend uses, and how.

One function, :func:`archive_target`, computes it per rank from the resolved settings the engine's flags gave
(``EngineArgs.foundry``): the path, the key, the mode the user asked for and the mode this rank's session runs in.
The graph backend (:mod:`.backend`) and the early load (:mod:`.early`) both take it from there. Pure: needs neither
torch nor the archive.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from foundry_core.session import SessionMode
from foundry_sglang.engine.config import EngineArgs
from foundry_sglang.graphs.keys import RankLayout, archive_key
from foundry_sglang.graphs.settings import FoundryMode

__all__ = ["ArchiveTarget", "archive_target"]


@dataclass(frozen=True)
class ArchiveTarget:
    """One rank's archive: where, under which key, and what its session does with it."""

    path: Path
    key: str
    device: int  # CUDA ordinal
    rank: Optional[int]  # the rank of a rank template (a TP/EP layout); None for a single-rank archive
    requested: FoundryMode  # what the user asked for (``--foundry-mode``, resolved)
    #: What this rank's session and router do: ``requested`` for a single rank; ``load`` for every rank of a TP/EP
    #: layout, whose one rank template rank 0 saves first when ``requested`` asks for it (``save``, or ``auto``
    #: without a usable template: ``FoundryGraphBackend.prepare_layout``). A rank's own graphs would hold live NCCL
    #: state, so a rank never saves in place.
    mode: FoundryMode

    @property
    def session_mode(self) -> SessionMode:
        return self.mode.session_mode

    @property
    def is_template(self) -> bool:
        """Whether this rank restores its layout's rank template."""
        return self.rank is not None


def archive_target(args: EngineArgs, rank: int = 0) -> ArchiveTarget:
    """Rank ``rank``'s archive under the archive directory, keyed by everything that changes the decode graphs
    (a TP/EP layout has one rank template: no rank in its key or path). ValueError for Foundry off."""
    config = args.foundry
    if not config.enabled:
        raise ValueError("Foundry is off for these engine arguments: no archive")
    layout = RankLayout(tp_size=args.tp, tp_rank=rank if args.tp > 1 else 0,
                        ep_size=args.ep, ep_rank=rank if args.ep > 1 else 0)
    material = {
        "model": args.model, "dtype": str(args.dtype), "page_size": args.page_size,
        "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
        "cuda_graph_bs": list(args.graph_batch_sizes()), "num_kv_pages": args.num_kv_pages, "seed": args.seed,
    }
    if args.ranks_share_gpu and args.num_kv_pages is None:  # ranks sharing a GPU split its KV memory (a smaller pool)
        material["ranks_per_gpu"] = args.ranks_per_gpu
    template = args.world_size > 1
    key = archive_key("builtin", args.model, material, layout, per_rank=not template)
    return ArchiveTarget(path=key.path(config.archive_dir), key=key.key, device=args.gpu_of(rank),
                         rank=rank if template else None, requested=config.mode,
                         mode=FoundryMode.LOAD if template else config.mode)
