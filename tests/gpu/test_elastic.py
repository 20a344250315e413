"""Live switches under load (elastic_switches.py; by hand: check_elastic.py): built-in workers locally, with a warm
standby and on Ray (where Ray is staged: scripts/stage_ray.py, docs/STAGING.md); SGLang workers, dense and MoE,
locally and on Ray (SGLang staged). With one GPU every slot shares it; with two, one GPU per slot."""
from __future__ import annotations

import importlib.util

import pytest

from gpu.elastic_switches import run_switches

pytestmark = [pytest.mark.gpu]

CASES = [("builtin", "local", 0, "", ""), ("builtin", "local", 1, "", ""),
         ("builtin", "local", 1, "", "--standby-coreside"), ("builtin", "ray", 0, "", ""),
         ("sglang", "local", 0, "dense", ""), ("sglang", "local", 1, "dense", ""),
         ("sglang", "local", 1, "dense", "--standby-coreside"), ("sglang", "local", 0, "moe", ""),
         ("sglang", "ray", 0, "dense", "")]


def case_id(worker, backend, standby, models, flag) -> str:
    return "-".join(str(x) for x in (worker, backend, f"standby{standby}" if standby else "", models,
                                      flag.strip("-").replace("standby-", "")) if x)


@pytest.mark.parametrize("worker, backend, standby, models, flag", [
    pytest.param(*case, marks=[pytest.mark.sglang] if case[0] == "sglang" else [], id=case_id(*case))
    for case in CASES])
def test_switches_under_load(worker, backend, standby, models, flag, out_dir, run_check, verdicts):
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray importable (stage it: scripts/stage_ray.py, docs/STAGING.md)")
    run_check(run_switches, str(out_dir), backend, standby, worker, None, models or "dense,moe",
              *([flag] if flag else []), timeout=590, echo=True)
    verdicts.assert_passed()
