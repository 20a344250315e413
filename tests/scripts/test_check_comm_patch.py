"""check_comm_patch.py's new parts on CPU: the layouts --ranks 4 runs build from the presets (meta tensors), the
template-cost rows (e) from stand-in captures, and the flags that do not fit together."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foundry_sglang.builtin.template import TemplateReport
from foundry_sglang.engine.config import builtin_config
from foundry_sglang.engine.model import Qwen3ForCausalLM
from foundry_sglang.engine.parallel import ParallelState, get_state, set_state
from foundry_sglang.graphs.settings import FoundryConfig

SCRIPT = Path(__file__).resolve().parents[1] / "gpu" / "check_comm_patch.py"


@pytest.fixture
def check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_comm_patch_e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check_comm_patch_e", module)
    spec.loader.exec_module(module)
    module.VERDICTS.echo = False
    return module


@pytest.mark.parametrize("kind,world", [("tp", 4), ("ep", 4), ("tp", 8), ("ep", 8)])
def test_every_rank_of_the_four_and_eight_rank_layouts_builds(check, kind, world):
    """TP needs the heads (32, kv 8), the MLP and the vocabulary to split; EP the 128 experts."""
    model = check.DENSE if kind == "tp" else check.MOE
    args = check.engine_args(model, world, 1, kind, foundry=FoundryConfig.resolve("load", "/tmp/x"),
                             **check.kv_pages(world))
    args.validate()
    assert args.ranks_share_gpu and args.gpu_ids == [0] * world and args.num_kv_pages == 8192 // world
    assert args.num_kv_pages - 1 >= max(args.graph_batch_sizes())  # _fill_inputs: one page per sequence
    cfg = builtin_config(model)
    saved = get_state()
    try:
        for rank in range(world):
            set_state(ParallelState(rank=rank, world_size=world, tp=args.tp, ep=args.ep, virtual=True))
            Qwen3ForCausalLM(cfg, torch.bfloat16, torch.device("meta"))
    finally:
        set_state(saved)
    assert check.kv_pages(2) == {}  # the two-rank parts keep their arguments


def fake_template(world, derived=True):
    names = ["rank0", "rank0-noise", f"rank{world - 1}"] + ([] if derived else [f"rank{r}" for r in
                                                                                range(1, world - 1)])
    return TemplateReport(path=Path("/tmp/t.foundry"), world_size=world, capture_seconds={n: 10.0 for n in names},
                          derived=list(range(1, world - 1)) if derived else [], merge_seconds=0.5,
                          summary=f"{world} ranks, noise 900 B masked, deltas none",
                          by_kernel={} if derived else {"at::native::vectorized_elementwise_kernel": 64})


def test_template_cost_rows(check, monkeypatch):
    saved = []
    monkeypatch.setattr(check, "live_capture_once",
                        lambda model, gpus: {"wall_s": 12.0, "init_s": 9.0, "weights_s": 1.0, "graphs_s": 4.0})

    def save(model, kind, gpus, label, world):
        saved.append((model, kind, label, world))
        return None, None, fake_template(world, derived=label != "e-ep4"), 31.0

    monkeypatch.setattr(check, "save_layout_template", save)
    check.check_template_costs(1, ["tp2", "tp4", "ep4"])
    assert saved == [(check.DENSE, "tp", "e-tp2", 2), (check.DENSE, "tp", "e-tp4", 4), (check.MOE, "ep", "e-ep4", 4)]
    rows = {name: (verdict, detail) for verdict, name, detail in check.VERDICTS.rows}
    verdict, detail = rows["(e) one live capture, dense"]
    assert verdict == "INFO" and "12.0 s from spawn" in detail
    verdict, detail = rows["(e) TP2 template in 3 captures, ranks derived"]
    assert verdict == "PASS" and detail.startswith("3 captures") and "ranks derived none" in detail
    verdict, detail = rows["(e) TP4 template in 3 captures, ranks derived"]
    assert verdict == "PASS" and "ranks derived [1, 2]" in detail and "2.58x one live capture (12.0 s)" in detail
    verdict, detail = rows["(e) EP4 template in 3 captures, ranks derived"]
    assert verdict == "FAIL" and detail.startswith("5 captures") and "vectorized_elementwise_kernel: 64 B" in detail
    assert check.DETAILS["e_tp4"]["captures"] == 3 and check.DETAILS["e_ep4"]["derived"] == []


def test_a_failed_layout_leaves_the_others_running(check, monkeypatch):
    monkeypatch.setattr(check, "live_capture_once", lambda model, gpus: {"error": "RuntimeError: no GPU"})

    def save(model, kind, gpus, label, world):
        if world == 2:
            raise RuntimeError("capture failed")
        return None, None, fake_template(world), 20.0

    monkeypatch.setattr(check, "save_layout_template", save)
    check.check_template_costs(1, ["tp2", "tp4"])
    rows = {name: verdict for verdict, name, _ in check.VERDICTS.rows}
    assert rows == {"(e) one live capture, dense": "FAIL", "(e) TP2 template in 3 captures, ranks derived": "FAIL",
                    "(e) TP4 template in 3 captures, ranks derived": "PASS"}


@pytest.mark.parametrize("flags,message", [(["--ranks", "4", "--gpus", "2"], "use it with --gpus 1"),
                                           (["--template-costs", "--cost-layouts", "tp3"], "choose from")])
def test_flags_that_do_not_fit(flags, message):
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[2]))
    proc = subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
