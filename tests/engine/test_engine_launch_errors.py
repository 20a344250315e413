"""Launch problems are one line and an exit status, never a traceback (issue 12, serving item 7)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(*args, module="foundry_sglang.launch"):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line or "error:" in line]
    return proc.returncode, proc.stderr, errors


def assert_one_line(code, stderr, errors, needle):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1 and needle in errors[0], stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu():
    assert_one_line(*launch("--device", "cuda", "--port", "0"), "no usable CUDA GPU")


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line(*launch("--device", "cpu", "--port", str(port)), "already in use")
        assert_one_line(*launch("--device", "cpu", "--port", str(port), module="foundry_sglang.engine"),
                        "already in use")


def test_load_mode_with_a_missing_archive(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert_one_line(*launch("--device", "cpu", "--port", "0", "--foundry-mode", "load", "--foundry-archive", missing),
                    "nowhere")
