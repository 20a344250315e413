"""One capture process of a rank template: virtual rank r of a TP/EP layout, alone on one GPU.

Started by :func:`foundry_sglang.builtin.template.save_template` (``python -m foundry_sglang.builtin.virtual_rank``);
not a user command. The process builds the engine's model runner for rank r with no process group, its collectives
recorded as slots (:class:`~.collectives.PlaceholderCollectives`), and writes one per-rank archive.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from foundry_core.errors import FoundryError
from foundry_core.session import Session, SessionMode
from foundry_sglang.engine.config import EngineArgs
from foundry_sglang.engine.model_runner import ModelRunner

from .backend import FoundryGraphBackend
from .collectives import PlaceholderCollectives

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    """Entry of one capture process (run by ``save_template``; not a user command)."""
    ap = argparse.ArgumentParser(description="Capture one virtual rank of a TP/EP layout into a Foundry archive "
                                             "(internal: started by foundry_sglang.builtin.template.save_template).")
    ap.add_argument("--rank", type=int, required=True, help="the virtual rank to capture")
    ap.add_argument("--gpu", type=int, required=True, help="CUDA device index to capture on")
    ap.add_argument("--key", required=True, help="archive key (the layout's template key)")
    ap.add_argument("--out", required=True, help="archive path to write")
    ap.add_argument("--args", required=True, help="EngineArgs as JSON")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = EngineArgs(**json.loads(ns.args))
        session = Session(ns.out, mode=SessionMode.SAVE, key=ns.key, device=ns.gpu, progress=False)
        backend = FoundryGraphBackend(session)
        ModelRunner(args, rank=ns.rank, graph_backend=backend, virtual=True, gpu=ns.gpu,
                    collectives=PlaceholderCollectives(session))
        if backend.archive_path is None:
            raise FoundryError("no archive was written")
    except FoundryError as e:
        print(f"foundry: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
