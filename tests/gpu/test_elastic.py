"""Live TP switching on two GPUs under load (elastic_switches.py), local processes, with a warm standby, and on
Ray (where Ray is staged: scripts/stage_ray.py, docs/STAGING.md)."""
from __future__ import annotations

import importlib.util

import pytest

from gpu.elastic_switches import run_switches

pytestmark = [pytest.mark.gpu, pytest.mark.two_gpu]


@pytest.mark.parametrize("backend, standby", [("local", 0), ("local", 1), ("ray", 0)],
                         ids=["local", "local-standby", "ray"])
def test_switches_under_load(backend, standby, out_dir, run_check, verdicts):
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray importable (stage it: scripts/stage_ray.py, docs/STAGING.md)")
    run_check(run_switches, out_dir, backend, standby, timeout=600, echo=True)
    verdicts.assert_passed()
