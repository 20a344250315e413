"""CPU tests of the built-in engine's early load (``foundry_sglang.builtin.early``): which starts begin one, that
it is for the archive the graph backend opens later, that the backend adopts it, and that it stays light."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundry_core import early
from foundry_sglang.builtin import early as preload
from foundry_sglang.builtin import keys
from foundry_sglang.builtin.backend import FoundryGraphBackend
from foundry_sglang.engine.config import EngineArgs
from foundry_sglang.engine.flags import build_arg_parser, engine_args_from
from foundry_sglang.graphs.settings import ENV_EARLY_LOAD, FoundryConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_early_loads_left(monkeypatch):
    monkeypatch.setenv(ENV_EARLY_LOAD, "1")  # test_early_load_is_on_by_default_and_zero_turns_it_off: the default
    yield
    for e in early.started():
        e.discard()


def argv_for(archive_dir: Path, *more: str) -> list[str]:
    return ["--model", "builtin:tiny", "--device", "cuda", "--foundry-archive", str(archive_dir), *more]


def put_archive(argv: list[str]) -> Path:
    """Something at the archive path the engine will open (not a valid archive: this machine has no GPU)."""
    path = keys.archive_target(engine_args_from(build_arg_parser().parse_args(argv))).path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an archive" * 20)
    return path


@pytest.mark.parametrize("changes", [{}, {"page_size": 32, "cuda_graph_bs": [1, 2], "seed": 3},
                                     {"tp": 2}, {"ep": 2, "gpu_ids": [1, 0]}])
def test_the_early_archive_is_the_one_the_graph_backend_opens(tmp_path, changes):
    args = EngineArgs(model="builtin:tiny", foundry=FoundryConfig.resolve(None, tmp_path), **changes)
    for rank in range(args.world_size):
        target = keys.archive_target(args, rank)
        session = FoundryGraphBackend.from_engine_args(args, rank=rank).session
        assert (target.path, target.key, target.device, target.rank) == (session.path, session.key, session.device,
                                                                         session.rank)
        assert target.mode.session_mode == session.requested_mode


def test_the_graph_backend_adopts_the_early_load_and_falls_back_for_its_reason(tmp_path):
    argv = argv_for(tmp_path, "--foundry-mode", "load")
    path = put_archive(argv)
    e = preload.start_from_argv(argv)
    assert e is not None and e.path == path
    backend = FoundryGraphBackend.from_engine_args(engine_args_from(build_arg_parser().parse_args(argv)))
    backend.before_allocations()  # Session.open(): the early load's ArchiveError, then live capture
    assert e.adopted and backend.session.open_stats.get("early_load") == 1.0
    assert backend.fallback_reason == f"cannot use {path}: ArchiveError: {e.problem}"
    marks = e.wait().timeline()
    assert marks["early_load_started"] <= marks["early_load_ready"]


@pytest.mark.parametrize("more", [
    (), ("--foundry-mode", "auto"),  # no archive yet: auto will save one
    ("--foundry-mode", "save"), ("--foundry-mode", "off"), ("--disable-cuda-graph",), ("--tp", "2"),
    ("--device", "cpu"), ("--standby",), ("--help",), ("--no-such-flag",), ("--page-size", "x"),
    ("--foundry-mode", "load", "--tp", "3", "--ep", "2"),  # refused by validate(): main() says so
])
def test_no_early_load_where_the_server_will_not_load_an_existing_archive(tmp_path, more, capsys):
    assert preload.start_from_argv(argv_for(tmp_path, *more)) is None
    assert early.started() == [] and not any(tmp_path.iterdir())
    assert capsys.readouterr().err == ""  # errors are main()'s to report, once


def test_early_load_is_on_by_default_and_zero_turns_it_off(tmp_path, monkeypatch):
    argv = argv_for(tmp_path, "--foundry-mode", "load")
    put_archive(argv)
    monkeypatch.delenv(ENV_EARLY_LOAD)
    e = preload.start_from_argv(argv)
    assert e is not None
    e.discard()
    monkeypatch.setenv(ENV_EARLY_LOAD, "0")
    assert preload.start_from_argv(argv) is None
    # a launcher hands "off" on to its children explicitly: their environment may say otherwise
    assert FoundryConfig.resolve("load", tmp_path, early_load=False).to_env()[ENV_EARLY_LOAD] == "0"
    assert FoundryConfig.from_env({ENV_EARLY_LOAD: "0"}).early_load is False
    assert FoundryConfig.from_env({}).early_load is True


@pytest.mark.parametrize("mode", ["auto", "load", "save"])
def test_an_existing_archive_is_loaded_early_unless_saving_or_turned_off(tmp_path, mode, monkeypatch):
    argv = argv_for(tmp_path, "--foundry-mode", mode)
    put_archive(argv)
    e = preload.start_from_argv(argv)
    assert (e is not None) == (mode != "save")
    if e is not None:
        e.discard()
        monkeypatch.setenv(ENV_EARLY_LOAD, "0")
        assert preload.start_from_argv(argv) is None


def test_reading_flags_and_starting_the_early_load_import_no_torch(tmp_path):
    argv = argv_for(tmp_path, "--foundry-mode", "load")
    put_archive(argv)
    code = ("import sys; from foundry_sglang.builtin.early import start_from_argv; "
            f"e = start_from_argv({argv!r}); assert e is not None; e.wait(); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), FOUNDRY_EARLY_LOAD="1"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_start_benchmark_keeps_the_early_load_out_of_the_phases():
    spec = importlib.util.spec_from_file_location("bench_start", REPO / "bench" / "start.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    marks = {"imported": 103.0, "early_load_started": 100.1, "early_load_ready": 100.5, "runner": 103.2}
    log = (f"x INFO startup timeline: {json.dumps(marks)}\n"
           "z INFO foundry_core.session: foundry: using the early load of /a/m.foundry (archive checked)\n"
           "y INFO foundry: restore() of 3 graphs: ..., preloader wait 0.004s (its tables 0.010s, ...)\n")
    assert bench.phases(log, 100.0, None) == pytest.approx({"import": 3.0, "engine_setup": 0.2})
    assert bench.background(log, 100.0) == pytest.approx({"early_load_ready_s": 0.5, "restore_waited_s": 0.004,
                                                          "early_load_adopted": True})
