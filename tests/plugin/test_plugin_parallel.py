"""CPU tests of the plugin's TP/EP support against the real sglang classes: which of SGLang's collectives become
which slots (order, dtypes, buffers), what is refused while a SAVE captures, that outside a capture the hooks are
SGLang's own collectives, the agreement between ranks, the rank template's file names and the launcher's part.

Two real processes form a gloo process group with SGLang's own ``init_distributed_environment`` and
``GroupCoordinator`` (``sglang_rank.py``). The CUDA halves (placeholder kernels, filling slots on pynccl, a real
TP=2/EP=2 server) run in tests/gpu/check_sglang_server.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundry_sglang import launch
from foundry_sglang.plugin import compat
from foundry_sglang.plugin.hooks import rank_part_path
from foundry_sglang.proc import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module")
def ranks():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(HERE / "sglang_rank.py"), str(r), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def test_outside_a_capture_the_hooks_are_sglangs_own_collectives(ranks):
    for r in ranks:
        assert r["live_all_reduce"] == [3.0] * 4  # 1 + 2 over gloo: nothing recorded, nothing skipped


def test_collectives_become_ordered_slots_with_their_buffers(ranks):
    for rank, r in enumerate(ranks):
        assert r["unique_name"] == "tp:0" and r["world_rank"] == rank
        assert [s["op"] for s in r["slots"]] == ["all_reduce", "all_gather", "reduce_scatter"]
        ar, ag, rs = r["slots"]
        assert ar == dict(op="all_reduce", group="tp:0", dtype="bfloat16", count=32, send_bytes=64, recv_bytes=64,
                          extra={})
        assert ag == dict(op="all_gather", group="tp:0", dtype="float32", count=15, send_bytes=60, recv_bytes=120,
                          extra={})
        assert rs == dict(op="reduce_scatter", group="tp:0", dtype="float32", count=4, send_bytes=32, recv_bytes=16,
                          extra={})
        assert r["buffers"] == r["expected_buffers"]  # in place for the all-reduce, as SGLang's in-place path
        assert r["in_place_returned_input"] and r["x_untouched"]  # nothing was communicated


def test_collectives_no_slot_stands_for_are_refused_by_name(ranks):
    for r in ranks:
        names = [name for name, _ in r["refused"]]
        assert names == ["broadcast", "all_to_all_single", "all_gather list"]
        for name, message in r["refused"]:
            assert "tp:0" in message and "cannot be saved" in message
            assert name.split()[0] in message


def test_ranks_agree_only_when_every_rank_is_ok(ranks):
    assert [r["agree"] for r in ranks] == [[True, False], [True, False]]


def test_rank_parts_sit_beside_the_template():
    template = Path("/a/qwen-tp2-0123456789ab.foundry")
    assert rank_part_path(template, 1) == Path("/a/qwen-tp2-0123456789ab.rank1.foundry")


def test_shared_gpu_hook_puts_every_rank_on_the_base_gpu(monkeypatch):
    target, kind, hook, _why = compat.shared_gpu_hook(lambda rank: seen.append(rank))
    seen: list[int] = []
    from types import SimpleNamespace

    args = SimpleNamespace(base_gpu_id=3, tp_size=2)
    if target.endswith("Scheduler.__init__"):  # sglang 0.5.17: the GPU is an argument of the scheduler
        new_args, _ = hook("self", args, "ports", 4, 1, 0, 0)
        assert new_args[3] == 3 and seen == [1]
    else:  # 0.5.23: it is published in the runtime context
        from sglang.srt.runtime_context import SpawnRanks

        _, kwargs = hook(args, role="scheduler", ranks=SpawnRanks(world_rank=1, dp_rank=None, gpu_id=4))
        assert kwargs["ranks"].gpu_id == 3 and kwargs["ranks"].world_rank == 1 and seen == [1]
    assert kind == "BEFORE"


def test_launcher_asks_for_shared_gpus_and_nccl_all_reduces(monkeypatch):
    ours, _ = launch.split_argv(["--foundry-ranks-share-gpu", "--tp-size", "2"])
    assert launch.foundry_config(ours, {}).to_env()["FOUNDRY_RANKS_SHARE_GPU"] == "1"
    ours, _ = launch.split_argv(["--tp-size", "2"])
    assert "FOUNDRY_RANKS_SHARE_GPU" not in launch.foundry_config(ours, {}).to_env()
