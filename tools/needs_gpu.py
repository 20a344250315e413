"""The one line a GPU script prints where it cannot run: too few CUDA GPUs (exit status 2, no traceback)."""
from __future__ import annotations

import sys


def exit_without_gpu(what: str = "this benchmark", count: int = 1) -> None:
    """Exit with status 2 and one line on stderr when fewer than ``count`` CUDA GPUs are visible."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= count:
        return
    if have == 0:
        print(f"no CUDA GPU: {what} needs {'one' if count == 1 else count}", file=sys.stderr)
    else:
        print(f"{have} CUDA GPU(s) visible: {what} needs {count}", file=sys.stderr)
    sys.exit(2)
