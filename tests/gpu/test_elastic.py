"""Live TP switching on two GPUs under load (elastic_switches.py), local processes, with a warm standby, and on
Ray (where Ray is staged: scripts/stage_ray.py, docs/STAGING.md)."""
from __future__ import annotations

import importlib.util

import pytest

from gpu.elastic_switches import run_switches
from gpu.fresh import run_function

pytestmark = [pytest.mark.gpu, pytest.mark.two_gpu]


@pytest.mark.parametrize("backend, standby", [("local", 0), ("local", 1), ("ray", 0)],
                         ids=["local", "local-standby", "ray"])
def test_switches_under_load(backend, standby, out_dir, verdicts):
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray importable (stage it: scripts/stage_ray.py, docs/STAGING.md)")
    ran = run_function(run_switches, out_dir, backend, standby, timeout=600,
                       log=out_dir / "switches.log", echo=True)
    if ran.value is None:
        verdicts.row(f"elastic TP switches ({backend})", False, ran.why(3))
    else:
        verdicts.extend(ran.value["rows"])
        verdicts.figures.update(ran.value["figures"])
    verdicts.assert_passed()
