"""python -m foundry_sglang.launch: our flags parsed, everything else forwarded untouched, dispatch targets."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from foundry_sglang import launch
from foundry_sglang.graphs.settings import FoundryConfig


def test_split_keeps_sglang_flags_untouched_and_in_order():
    argv = ["--model", "Qwen/Qwen3-8B", "--foundry-mode", "load", "--tp-size", "1", "--foundry-archive=/tmp/a",
            "--elastic-ep-backend", "x", "--port", "30001"]
    ours, rest = launch.split_argv(argv)
    assert ours.foundry_mode == "load" and ours.foundry_archive == "/tmp/a" and not ours.elastic
    assert rest == ["--model", "Qwen/Qwen3-8B", "--tp-size", "1", "--elastic-ep-backend", "x", "--port", "30001"]


def test_bad_mode_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "foundry_sglang.launch", "--foundry-mode", "maybe"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_our_flags():
    proc = subprocess.run([sys.executable, "-m", "foundry_sglang.launch", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for flag in ("--foundry-archive", "--foundry-mode", "--foundry-engine", "--elastic", "sglang.launch_server"):
        assert flag in proc.stdout


def test_pins_added_only_when_user_chose_nothing():
    argv, added = launch.apply_pins(["--model", "m"])
    assert added == ["--cuda-graph-backend-prefill", "disabled"] and argv[-2:] == added
    for user in (["--cuda-graph-backend-prefill", "full"], ["--cuda-graph-backend-prefill=breakable"],
                 ["--disable-prefill-cuda-graph"], ["--disable-cuda-graph"]):
        assert launch.apply_pins(["--model", "m"] + user)[1] == []


def test_env_flags_win_over_environment():
    ours, _ = launch.split_argv(["--foundry-mode", "save"])
    config = launch.foundry_config(ours, {"FOUNDRY_MODE": "load", "FOUNDRY_ARCHIVE": "/x"})
    assert config.to_env() == {"FOUNDRY_MODE": "save", "FOUNDRY_ARCHIVE": "/x"}
    ours, _ = launch.split_argv([])
    assert launch.foundry_config(ours, {}).mode == "auto"


@pytest.fixture()
def recorded(monkeypatch):
    """Replace the three dispatch targets by recorders (the real ones start servers)."""
    calls = {}
    monkeypatch.setattr(launch, "run_sglang", lambda rest, cfg: calls.setdefault("sglang", (rest, cfg)) and 0)
    monkeypatch.setattr(launch, "run_builtin", lambda rest, cfg: calls.setdefault("builtin", (rest, cfg)) and 0)
    monkeypatch.setattr(launch, "run_elastic", lambda rest, cfg: calls.setdefault("elastic", (rest, cfg)) and 0)
    return calls


def test_dispatch_sglang_when_importable(recorded, monkeypatch):
    monkeypatch.setattr(launch, "sglang_available", lambda: None)
    monkeypatch.setattr(launch, "builtin_preferred", lambda rest: None)  # as on a GPU machine
    assert launch.main(["--model", "m", "--foundry-archive", "/tmp/arch"]) == 0
    rest, config = recorded["sglang"]
    assert rest == ["--model", "m"] and config.archive_dir == Path("/tmp/arch")


def test_dispatch_builtin_when_sglang_missing(recorded, monkeypatch, caplog):
    monkeypatch.setattr(launch, "sglang_available", lambda: "ModuleNotFoundError: No module named 'sglang'")
    monkeypatch.setattr(launch, "builtin_preferred", lambda rest: None)  # as on a GPU machine
    with caplog.at_level("WARNING"):
        assert launch.main(["--model", "m"]) == 0
    assert "builtin" in recorded and "not using SGLang (ModuleNotFoundError" in caplog.text


@pytest.mark.parametrize("rest, why", [
    ([], "no --model"),
    (["--model", "builtin:tiny"], "built-in preset"),
    (["--model-path=builtin:qwen3-8b"], "built-in preset"),
])
def test_auto_prefers_builtin_for_presets_and_defaults(rest, why):
    assert why in launch.builtin_preferred(rest)


def test_auto_prefers_builtin_without_gpu(recorded, monkeypatch, caplog):
    import torch

    monkeypatch.setattr(launch, "sglang_available", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert launch.main(["--model", "Qwen/Qwen3-8B"]) == 0
    assert "builtin" in recorded and "no CUDA GPU" in caplog.text


def test_dispatch_elastic(recorded):
    assert launch.main(["--elastic", "--model", "m"]) == 0
    assert recorded["elastic"][0] == ["--model", "m"]


def test_engine_sglang_insisted_but_missing_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(launch, "sglang_available", lambda: "ImportError: nope")
    assert launch.main(["--foundry-engine", "sglang"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_engine_sglang_without_a_gpu_is_one_line_before_sglang_starts(recorded, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(launch, "sglang_available", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.main(["--foundry-engine", "sglang", "--model", "/m"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sglang" not in recorded and err.count("\n") == 0 and "no CUDA GPU" in err and "builtin" in err, err
    assert launch.main(["--foundry-engine", "sglang", "--model", "/m", "--device", "cpu"]) == 0   # SGLang's CPU
    assert "sglang" in recorded


def test_a_typo_fails_at_once_with_the_launchers_usage():
    """``--modle``: the launcher's usage and one error line, before torch, SGLang or the engine is imported."""
    code = ("import sys; from foundry_sglang import launch; rc = launch.main(['--modle', 'x']); "
            "print(rc, sorted(m for m in ('torch', 'sglang', 'foundry_sglang.engine.server') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert "usage: python -m foundry_sglang.launch" in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "unrecognized arguments: --modle x" in errors[0], proc.stderr
    assert "foundry_sglang.engine:" not in proc.stderr and "Traceback" not in proc.stderr


def test_run_builtin_hands_settings_to_the_engine_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr(launch, "serve_builtin", lambda argv: seen.setdefault("argv", argv) and 0)
    launch.run_builtin(["--model", "m"], FoundryConfig.resolve("auto", "/a"))
    assert seen["argv"] == ["--model", "m", "--foundry-archive", "/a", "--foundry-mode", "auto"]
    seen.clear()
    launch.run_builtin(["--model", "m", "--foundry-mode=off"], FoundryConfig.resolve("auto", "/a"))
    assert seen["argv"] == ["--model", "m", "--foundry-mode=off", "--foundry-archive", "/a"]  # the user's flag wins


def test_launcher_flags_reach_the_real_engine_parser():
    from foundry_sglang.engine.server import build_arg_parser, engine_args_from

    ours, rest = launch.split_argv(["--model", "builtin:tiny", "--foundry-mode", "load", "--foundry-archive", "/a"])
    argv = rest + launch.foundry_config(ours, {}).engine_flags()
    config = engine_args_from(build_arg_parser().parse_args(argv)).foundry
    assert config.mode == "load" and str(config.archive_dir) == "/a"


def test_run_sglang_refuses_unsafe_flag_before_starting(monkeypatch):
    pytest.importorskip("sglang.srt.server_args")
    started = []
    monkeypatch.setattr(launch, "_resolve", lambda t: started.append(t))
    monkeypatch.setattr(launch.os, "environ", {})
    with pytest.raises(launch.LaunchError, match="--enable-memory-saver"):
        launch.run_sglang(["--model", "/m", "--enable-memory-saver"], FoundryConfig.resolve("save", "/a"))
    assert started == []


def test_run_sglang_forwards_parsed_args_and_sets_env(monkeypatch):
    pytest.importorskip("sglang.srt.server_args")
    import sglang.srt.plugins as sp

    served = {}
    monkeypatch.setattr(sp, "load_plugins", lambda: served.setdefault("plugins", True))
    monkeypatch.setattr(launch, "_resolve", lambda t: (lambda *a, **k: served.setdefault(t, a)))
    env = {}
    monkeypatch.setattr(launch.os, "environ", env)
    launch.run_sglang(["--model", "/m", "--port", "30123"], FoundryConfig.resolve("auto", "/a"))
    args = served["sglang.launch_server:run_server"][0]
    assert args.model_path == "/m" and args.port == 30123 and args.cuda_graph_backend_prefill == "disabled"
    assert env["FOUNDRY_MODE"] == "auto" and env["FOUNDRY_ARCHIVE"] == "/a"


def test_elastic_help_goes_to_the_elastic_launcher():
    ours, rest = launch.split_argv(["--elastic", "--help", "--model", "builtin:tiny"])
    assert ours.elastic and rest == ["--model", "builtin:tiny", "--help"]


def test_run_sglang_turns_off_the_allreduce_fusion_sglang_chose_for_tp(monkeypatch):
    """SGLang 0.5.17 sets flashinfer_allreduce_fusion_backend="auto" by itself for Qwen3-MoE with TP > 1 on
    Hopper; the launcher turns it off as it adds --disable-custom-all-reduce, so the plugin does not refuse."""
    pytest.importorskip("sglang.srt.server_args")
    import sglang.srt.plugins as sp
    import sglang.srt.server_args as sa

    real = sa.prepare_server_args

    def as_on_hopper(argv):
        args = real(argv)
        args.flashinfer_allreduce_fusion_backend = "auto"       # what SGLang's MoE override resolves there
        return args
    monkeypatch.setattr(sa, "prepare_server_args", as_on_hopper)
    served = {}
    monkeypatch.setattr(sp, "load_plugins", lambda: served.setdefault("plugins", True))
    monkeypatch.setattr(launch, "_resolve", lambda t: (lambda *a, **k: served.setdefault(t, a)))
    monkeypatch.setattr(launch.os, "environ", {})
    launch.run_sglang(["--model", "/m", "--tp-size", "2"], FoundryConfig.resolve("auto", "/a"))
    args = served["sglang.launch_server:run_server"][0]
    assert args.disable_custom_all_reduce and args.enforce_disable_flashinfer_allreduce_fusion
    assert args.flashinfer_allreduce_fusion_backend is None
