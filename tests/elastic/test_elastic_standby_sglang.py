"""Standby workers of the ``sglang`` kind: real processes on CPU.

SGLang cannot serve on CPU, so these tests go up to where SGLang's own launch begins: a real standby imports
SGLang and warms its forkserver with the scheduler side, then takes its arguments through the same stdin
protocol as the built-in standby and runs ``foundry_sglang.launch.main`` with them (which, for a ``builtin:``
preset, serves it with the built-in engine: the served answers are real). The forkserver mechanism itself
(processes SGLang starts with ``mp.Process`` fork from it, with the launcher's environment, and die with the
launcher) is checked with a stand-in launcher script.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from waiting import gone, wait_until

from foundry_sglang.elastic.deployment import DeploymentConfig
from foundry_sglang.elastic.launch import build_parser, config_from_args
from foundry_sglang.elastic.workers import ProcessWorker, WorkerSpec, http_ok, standby_command
from foundry_sglang.plugin.standby import model_modules

pytest.importorskip("sglang.srt.server_args")

HERE = Path(__file__).resolve().parent
ENGINE_ARGS = ["--num-kv-pages", "256"]
ENV = {"OMP_NUM_THREADS": "1"}
BODY = {"prompt": "standby", "max_tokens": 6, "temperature": 0}
WARM_S = 300.0     # importing SGLang twice (standby and forkserver) on a busy 2-core machine


def test_standby_command_and_flags_take_the_sglang_kind(tmp_path):
    cmd = standby_command(WorkerSpec(model="m", kind="sglang", device="cuda"), gpu_index=1)
    assert cmd[1:] == ["-m", "foundry_sglang.plugin.standby", "--device", "cuda", "--gpu", "1"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    cmd = standby_command(WorkerSpec(model=str(tmp_path), kind="sglang", device="cpu"))
    assert cmd[-2:] == ["--model-path", str(tmp_path)]
    assert model_modules(str(tmp_path)) == ["sglang.srt.models.qwen3_moe"]     # its model file, found as text
    assert model_modules("builtin:tiny") == [] and model_modules(None) == []
    args = build_parser().parse_args(["--device", "cpu", "--backend", "local", "--worker", "sglang", "--standby", "1"])
    assert config_from_args(args, []).standby == 1
    assert DeploymentConfig(model="builtin:tiny", kind="sglang", backend="local", standby=1).standby == 1


@pytest.mark.slow
def test_sglang_standby_preloads_the_scheduler_side_and_runs_the_launcher_with_its_argv(tmp_path):
    log_path = tmp_path / "standby.log"
    spec = WorkerSpec(model="builtin:tiny", tp=2, kind="sglang", device="cpu", extra_args=ENGINE_ARGS, env=ENV,
                      log_path=str(log_path))
    w = ProcessWorker()
    t0 = time.monotonic()
    w.start_standby(spec)
    try:
        wait_until(lambda: w.standby_ready() or w.returncode() is not None, timeout=WARM_S, what="standby warm")
        assert w.returncode() is None, log_path.read_text()[-2000:]
        warm_s = time.monotonic() - t0
        text = log_path.read_text()
        [line] = [x for x in text.splitlines() if "standby: forkserver pid" in x]
        for module in ("torch", "sglang.srt.model_executor.model_runner", "foundry_sglang.plugin.hooks"):
            assert module in line, line       # imported in the forkserver before any layout was known
        pid = w.pid
        t1 = time.monotonic()
        url = w.activate(spec)
        wait_until(lambda: http_ok(url + "/health") or w.returncode() is not None, timeout=WARM_S,
                   what="activated standby")
        print(f"\n  sglang-kind standby: warm after {warm_s:.1f}s, serving {time.monotonic() - t1:.1f}s after "
              f"its arguments came")
        assert w.pid == pid and w.returncode() is None        # the warm process itself serves
        out = requests.post(url + "/v1/completions", json=BODY, timeout=60).json()
        assert out["usage"]["completion_tokens"] == 6
    finally:
        w.stop()
    text = log_path.read_text()
    assert "arguments received" in text
    # foundry_sglang.launch.main(argv) ran in the standby: its dispatch read the --model-path of the argv
    assert "not using SGLang (builtin:tiny is a built-in preset)" in text


def test_processes_sglang_starts_fork_from_the_warm_forkserver_and_die_with_the_launcher(tmp_path):
    """Forked, warm, with the launcher's environment and limits; a crash report (SIGQUIT to the parent) reaches
    the launcher; gone when the launcher dies."""
    path = [str(HERE.parents[1]), str(HERE), os.environ.get("PYTHONPATH", "")]   # HERE: the forkserver's too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), TMPDIR_FOR_TEST=str(tmp_path))
    launcher = subprocess.Popen([sys.executable, str(HERE / "forkserver_launcher.py")], stdout=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
    children = []
    try:
        out = json.loads(launcher.stdout.readline())
        warm, forked = out["warm"], out["forked"]
        children = [forked["pid"], out["spawned"]["pid"], out["forkserver"]]
        assert warm["ok"] == ["torch", "json", "foundry_sglang.graphs.keys"] and "no_such_module_here" in warm["failed"]
        assert "initialises CUDA at import" in warm["failed"]["cuda_at_import"]   # refused: fit to fork from
        assert forked["ppid"] == out["forkserver"] != out["launcher"]        # forked, not spawned
        assert forked["preloaded"] and forked["mode"] == "load"             # warm, with the launcher's environment
        assert forked["nofile"] == out["nofile"]                            # and its limits (SGLang's set_ulimit)
        assert out["sigquit"] and out["forkserver_alive"]      # a crash report reaches the launcher, not the forkserver
        # LD_LIBRARY_PATH changed after the forkserver started: that process was spawned as before
        assert out["spawned"]["ppid"] == out["launcher"] and not out["spawned"]["preloaded"]
        # SGLang's NUMA binding checks for spawn, then swaps the executable: that process was spawned through it
        assert out["start_method"] == "spawn" and out["wrapped"]["ppid"] != out["forkserver"]
        children.append(out["wrapped"]["pid"])
        os.kill(out["launcher"], signal.SIGKILL)
        launcher.wait(10)
        wait_until(lambda: gone(forked["pid"]), timeout=30, what="forked process gone with its launcher")
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
        for pid in children:      # whatever outlived the launcher (the spawned one always does)
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_standby_sets_what_sglangs_launcher_sets_before_its_forkserver_starts():
    """SGLang's limits (a forked process keeps the thread stack size its forkserver started with) and in-process
    NUMA binding (a forked process cannot be exec'd through numactl), unless the user chose otherwise."""
    pytest.importorskip("sglang.srt.utils.common")
    code = ("import json, os, resource\n"
            "resource.setrlimit(resource.RLIMIT_STACK, (8 << 20, resource.getrlimit(resource.RLIMIT_STACK)[1]))\n"
            "from foundry_sglang.plugin import standby\n"
            "standby._as_sglangs_launcher()\n"
            "print(json.dumps({'numa': os.environ.get('SGLANG_NUMA_BIND_V2'),\n"
            "                  'stack': resource.getrlimit(resource.RLIMIT_STACK)}))\n")
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_NUMA_BIND_V2"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True, timeout=300).stdout.splitlines()[-1])
    soft, hard = out["stack"]
    assert out["numa"] == "0" and (soft == 1024 * 65535 or hard != -1 and hard < 1024 * 65535)
    mine = subprocess.run([sys.executable, "-c", code], env=dict(env, SGLANG_NUMA_BIND_V2="1"), capture_output=True,
                          text=True, check=True, timeout=300).stdout.splitlines()[-1]
    assert json.loads(mine)["numa"] == "1"                      # a user's choice stays
