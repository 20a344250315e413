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
def ranks(tmp_path_factory):
    port, workdir = free_port(), tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(HERE / "sglang_rank.py"), str(r), str(port), str(workdir)], env=env,
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


def test_one_rank_without_room_for_the_saved_kv_pool_sends_every_rank_to_live_capture(ranks):
    short, roomy = ranks[1]["kv_pool"], ranks[0]["kv_pool"]
    assert "does not fit" in short["problem"] and "another rank" in roomy["problem"]
    for r in (short, roomy):    # SGLang's own pool and live capture on both: neither waits for the other
        assert r["route"] == "live" and not r["forced"] and r["tokens"] == 1024


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


# -- which archive a TP/EP server's ranks use -----------------------------------------------------------------------
class Ranks:
    """Agreement with the other ranks: ``agree(ok)`` is ok here and there; the others say no to the questions
    numbered in ``no`` (1: the archive directory exists, 2: the template exists, 3: this rank's part exists, ...)."""

    def __init__(self, no: tuple = ()):
        self.no = no
        self.calls = 0

    def __call__(self, ok: bool) -> bool:
        self.calls += 1
        return ok and self.calls not in self.no


def _open(tmp_path, mode, monkeypatch, others_no=(), template=None, part=None):
    from plugin_standins import CpuStandInSession

    from foundry_sglang.graphs.keys import ArchiveKey
    from foundry_sglang.graphs.settings import FoundryConfig
    from foundry_sglang.plugin import hooks

    monkeypatch.setattr(hooks.foundry_core, "Session", CpuStandInSession)
    key = ArchiveKey(file_name="m-tp2-0123456789ab.foundry", key="sglang:k", material="{}")
    archives = hooks.ParallelArchives(key.path(tmp_path), rank=1, world=2, agree=Ranks(others_no))
    for path, content in ((archives.template, template), (archives.part, part)):
        if content is not None:
            path.write_text(json.dumps({"key": content, "extra": {}, "graphs": {}}))
    router = hooks._open_parallel(FoundryConfig.resolve(mode, tmp_path), key, 0, archives)
    return router, archives


def test_ranks_load_the_template_with_their_rank(tmp_path, monkeypatch):
    router, archives = _open(tmp_path, "auto", monkeypatch, template="sglang:k")
    assert router.route == "load" and router.session.path == str(archives.template) and router.session.rank == 1


def test_ranks_load_their_parts_where_no_template_was_made(tmp_path, monkeypatch):
    router, archives = _open(tmp_path, "auto", monkeypatch, part="sglang:k")
    assert router.route == "load" and router.session.path == str(archives.part) and router.session.rank is None


def test_first_start_saves_every_rank_part(tmp_path, monkeypatch):
    router, archives = _open(tmp_path, "auto", monkeypatch)
    assert router.route == "save" and router.session.path == str(archives.part)
    assert archives.part.name == "m-tp2-0123456789ab.rank1.foundry"


def test_a_rank_without_the_template_makes_every_rank_save_its_part_in_auto(tmp_path, monkeypatch):
    router, archives = _open(tmp_path, "auto", monkeypatch, others_no=(2,), template="sglang:k")
    assert router.route == "save" and router.session.path == str(archives.part)  # all ranks take one route


def test_a_rank_that_cannot_open_the_template_makes_every_rank_serve_live_in_load(tmp_path, monkeypatch):
    router, _ = _open(tmp_path, "load", monkeypatch, others_no=(3,), template="sglang:k")
    assert router.route == "live"  # the 3rd question is "opened the template?": another rank said no


def test_load_without_any_archive_serves_live_with_one_line(tmp_path, monkeypatch, caplog):
    with caplog.at_level("WARNING"):
        router, _ = _open(tmp_path, "load", monkeypatch)
    assert router is None
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "no archive for this layout" in lines[0]


def test_an_unusable_template_is_saved_anew_in_auto(tmp_path, monkeypatch):
    router, archives = _open(tmp_path, "auto", monkeypatch, template="sglang:another-key")
    assert router.route == "save" and router.session.path == str(archives.part)


def test_rank_parts_become_one_template(tmp_path, monkeypatch):
    from conftest import sample_archive

    from foundry_sglang.plugin import hooks

    template = tmp_path / "m-tp2-0123456789ab.foundry"
    archives = hooks.ParallelArchives(template, rank=0, world=2, agree=Ranks())
    for r in range(2):
        sample_archive(hooks.rank_part_path(template, r))
    barriers = []
    monkeypatch.setattr(hooks.collectives, "barrier", lambda: barriers.append(1))
    hooks._write_template(archives, written=True)
    assert template.exists() and not any(hooks.rank_part_path(template, r).exists() for r in range(2))
    assert barriers == [1]
