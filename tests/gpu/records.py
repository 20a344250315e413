"""The JSON record of a GPU test or script: date, device, commit, rows and figures."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from gpu.verdicts import Verdicts

REPO = Path(__file__).resolve().parents[2]


def commit() -> str:
    """$FOUNDRY_COMMIT (a copy without .git), else ``git rev-parse HEAD`` of the repo, else "unknown"."""
    if os.environ.get("FOUNDRY_COMMIT"):
        return os.environ["FOUNDRY_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() or "unknown"


def write_record(path: Path, verdicts: Verdicts, device: str, commit_id: str | None = None) -> Path:
    """Write ``path`` (a .json file; its folder is made): the date (UTC), ``device`` (the GPU's name from torch),
    the commit (``commit_id``, else ``commit()``), the rows and the figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"name": verdicts.title, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device,
           "commit": commit_id or commit(), "rows": [list(r) for r in verdicts.rows], "figures": verdicts.figures}
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path
