#!/usr/bin/env python3
"""Stage Ray 2.60.0 (cp312, with what ``ray[serve]`` needs beyond the image) onto a GPU host without a package index.

``scripts/stage_sglang.py`` with ``--set ray`` as the default: ``build`` on the build machine (parts under
``.stage/ray/parts``), then ``append`` each part and ``install --check`` on the GPU host (``/tmp/foundry_ray``).
See docs/STAGING.md for the whole procedure.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("stage_sglang", Path(__file__).resolve().parent / "stage_sglang.py")
stage_sglang = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_sglang)

if __name__ == "__main__":
    sys.exit(stage_sglang.main(default_set="ray", prog="scripts/stage_ray.py"))
