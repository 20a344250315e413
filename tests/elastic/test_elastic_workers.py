"""Worker command construction, the elastic launcher's flags, the Serve app builder and its YAML (no GPU)."""
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from foundry_sglang.elastic.controller import Controller
from foundry_sglang.elastic.deployment import DeploymentConfig
from foundry_sglang.elastic.launch import build_parser, config_from_args, main
from foundry_sglang.elastic.layout import Layout
from foundry_sglang.elastic.router import Router
from foundry_sglang.elastic.workers import WorkerSpec, build_command, build_env
from foundry_sglang.graphs.keys import RankLayout, layout_dir
from foundry_sglang.graphs.settings import FoundryConfig, FoundryMode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_builtin_worker_command():
    spec = WorkerSpec(model="builtin:tiny", tp=2, ep=1, device="cpu", extra_args=["--num-kv-pages", "64"])
    cmd = build_command(spec, 4321)
    assert cmd[:3] == [sys.executable, "-m", "foundry_sglang.engine"]
    assert cmd[3:] == ["--model", "builtin:tiny", "--tp", "2", "--ep", "1", "--host", "127.0.0.1", "--port",
                       "4321", "--device", "cpu", "--num-kv-pages", "64"]
    env = build_env(spec, [])
    assert env["CUDA_VISIBLE_DEVICES"] == "" and REPO in env["PYTHONPATH"].split(os.pathsep)


def test_sglang_worker_command_enables_plugin_and_archive():
    archive = str(layout_dir("/data/foundry", "/models/Qwen3-8B/", RankLayout(tp_size=2)))
    assert archive == "/data/foundry/Qwen3-8B/tp2"
    spec = WorkerSpec(model="/models/Qwen3-8B", tp=2, ep=2, kind="sglang", device="cuda",
                      foundry=FoundryConfig.resolve("auto", archive), extra_args=["--cuda-graph-max-bs-decode", "64"])
    cmd = build_command(spec, 30001)
    assert cmd[1:3] == ["-m", "foundry_sglang.launch"]
    joined = " ".join(cmd)
    for part in ("--model-path /models/Qwen3-8B", "--tp-size 2", "--ep-size 2", "--host 127.0.0.1",
                 "--port 30001", f"--foundry-archive {archive}", "--foundry-mode auto",
                 "--cuda-graph-max-bs-decode 64"):
        assert part in joined
    env = build_env(spec, [2, 3])
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["SGLANG_PLUGINS"] == "foundry"
    with pytest.raises(ValueError, match="unknown worker kind"):
        build_command(WorkerSpec(model="m", kind="vllm"), 1)


def test_launcher_flags_map_to_config():
    args = build_parser().parse_args(["--elastic", "--model", "builtin:tiny", "--tp", "2", "--replicas", "2",
                                      "--device", "cpu", "--backend", "local", "--foundry-archive", "/a",
                                      "--engine-arg=--page-size=32"])
    cfg = config_from_args(args, ["--num-kv-pages", "64"])
    assert (cfg.slots, cfg.tp, cfg.replicas, cfg.backend) == (4, 2, 2, "local")
    assert cfg.foundry == FoundryConfig()    # no CUDA graphs on CPU
    on_gpu = config_from_args(build_parser().parse_args(["--device", "cuda", "--foundry-archive", "/a"]), [])
    assert on_gpu.foundry == FoundryConfig(FoundryMode.AUTO, Path("/a"))
    assert cfg.extra_args == ["--page-size=32", "--num-kv-pages", "64"]
    assert main(["--tp", "3", "--slots", "4", "--device", "cpu"]) == 2     # 4 heads: one line, exit 2
    assert main(["--policy", "[1]"]) == 2


def test_serve_app_builds_and_yaml_matches():
    pytest.importorskip("ray.serve")
    import yaml

    from foundry_sglang.elastic.serve import build_app, config_from_dict
    with open(os.path.join(REPO, "launch", "elastic_serve.yaml")) as f:
        doc = yaml.safe_load(f)
    app_cfg = doc["applications"][0]
    assert app_cfg["import_path"] == "foundry_sglang.elastic.serve:build_app"
    cfg = config_from_dict(app_cfg["args"])          # every YAML arg is a known field
    assert cfg.backend == "ray" and cfg.host == "127.0.0.1"
    assert cfg.foundry == FoundryConfig.resolve("auto", app_cfg["args"]["foundry"]["archive_dir"])
    with pytest.raises(ValueError, match="unknown foundry setting.*archive_root"):
        config_from_dict({"model": "builtin:tiny", "foundry": {"archive_root": "/a"}})
    app = build_app({"model": "builtin:tiny", "slots": 2, "device": "cpu"})
    from ray.serve import Application
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown elastic argument"):
        build_app({"model": "builtin:tiny", "tensor_parallel": 2})


def test_one_foundry_config_reaches_every_worker_of_a_layout(tmp_path):
    foundry = FoundryConfig.resolve("load", tmp_path)
    cfg = DeploymentConfig(model="builtin:tiny", slots=4, tp=2, device="cuda", foundry=foundry)
    assert DeploymentConfig(**asdict(cfg)) == cfg     # what the Ray controller actor receives and rebuilds
    controller = Controller(cfg.controller_config(), backend=None, router=Router())
    spec = controller._spec_for(Layout(tp=2, ep=1, replicas=1), 3)(0)
    layout_archive = layout_dir(tmp_path, "builtin:tiny", RankLayout(tp_size=2))
    assert spec.foundry == FoundryConfig(FoundryMode.LOAD, layout_archive)
    assert build_command(spec, 1)[-4:] == ["--foundry-archive", str(layout_archive), "--foundry-mode", "load"]
    assert WorkerSpec(**{**spec.to_dict(), "foundry": asdict(spec.foundry)}) == spec
    off = Controller(DeploymentConfig(model="builtin:tiny").controller_config(), backend=None, router=Router())
    assert "--foundry-mode" not in build_command(off._spec_for(Layout(), 1)(0), 1)


# -- the elastic launcher's start-up problems: one line, before anything starts ----------------------------
@pytest.fixture()
def never_started(monkeypatch):
    """ElasticDeployment.start must not be reached (nothing of Ray or the engines starts)."""
    from foundry_sglang.elastic import launch

    def refuse(self):
        raise AssertionError("the deployment was started")
    monkeypatch.setattr(launch.ElasticDeployment, "start", refuse)


def _launch_errors(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "foundry_sglang.elastic.launch"
            and r.levelname == "ERROR"]


def test_elastic_port_in_use_is_one_line_before_anything_starts(never_started, caplog):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["--device", "cpu", "--backend", "local", "--port", str(port)]) == 2
    errors = _launch_errors(caplog)
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "in use" in errors[0], errors


def test_elastic_without_a_gpu_says_so_at_once(never_started, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU message; this machine has a CUDA GPU")
    assert main(["--port", "0"]) == 2            # --device cuda is the default
    errors = _launch_errors(caplog)
    assert len(errors) == 1 and "no usable CUDA GPU" in errors[0] and "--device cpu" in errors[0], errors


def test_elastic_start_failure_is_one_line(tmp_path):
    """The first generation cannot start (its engine refuses a flag): one line and an exit status."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "foundry_sglang.launch", "--elastic", "--device", "cpu",
                           "--backend", "local", "--port", "0", "--log-dir", str(tmp_path), "--start-timeout", "120",
                           "--", "--no-such-engine-flag"], env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "cannot start" in errors[0] and "exited with status 2" in errors[0], proc.stderr


def test_an_open_admin_api_on_a_public_address_is_warned_about(caplog):
    from foundry_sglang.elastic.deployment import ElasticDeployment, exposure_warning
    from foundry_sglang.elastic.layout import LayoutError

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, None) is None, host
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host"):
        assert "anyone who can reach" in exposure_warning(host, None), host
        assert exposure_warning(host, "token") is None
    dep = ElasticDeployment(DeploymentConfig(model="builtin:no-such-preset", host="0.0.0.0", backend="local"))
    with pytest.raises(LayoutError):
        dep.start()
    dep.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "0.0.0.0" in r.getMessage()]
    assert len(warnings) == 1 and "--api-token" in warnings[0], caplog.text
