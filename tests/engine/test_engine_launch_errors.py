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


def test_bad_server_limits():
    assert_one_line(*launch("--device", "cpu", "--port", "0", "--body-timeout", "0", module="foundry_sglang.engine"),
                    "--body-timeout")


def _serve_until_ready(*args, module="foundry_sglang.launch", timeout=120):
    """Start a server, wait for its ready line, stop it with SIGTERM; (exit status, stderr)."""
    import re
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if re.search(r"ready: serving", line):
                proc.send_signal(signal.SIGTERM)
                break
        lines.extend(proc.stderr)
        return proc.wait(30), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_mode_with_a_missing_archive_serves_with_one_log_line(tmp_path):
    """As --help says: load falls back (on CPU: serves without graphs) with one log line, for a missing archive
    and for a missing archive directory."""
    missing = str(tmp_path / "nowhere" / "deeper")
    code, stderr = _serve_until_ready("--device", "cpu", "--port", "0", "--foundry-mode", "load",
                                      "--foundry-archive", missing)
    assert code == 0 and "ready: serving" in stderr, stderr
    assert "Traceback" not in stderr and " ERROR " not in stderr, stderr
    notes = [line for line in stderr.splitlines() if "nowhere" in line and " WARNING " in line]
    assert len(notes) == 1, stderr


def test_the_other_rank_of_a_killed_engine_exits_with_one_line():
    """SIGKILL rank 0 of a TP=2 server in the middle of generating: rank 1 loses its peer inside a collective and
    must say so in one line, not a traceback."""
    import re
    import signal
    import threading
    import time

    import requests

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "foundry_sglang.engine", "--tp", "2", "--device", "cpu",
                             "--port", "0", "--num-kv-pages", "64"], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    try:
        deadline = time.time() + 120
        url = None
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            m = re.search(r"ready: serving \S+ at (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        reader.start()
        threading.Thread(target=lambda: requests.post(url + "/v1/completions", timeout=60, json={
            "prompt": "x", "max_tokens": 500, "temperature": 0, "ignore_eos": True}), daemon=True).start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        reader.join(30)      # stderr closes when rank 1 (which inherited it) has exited
        assert not reader.is_alive(), "rank 1 did not exit"
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert "Traceback" not in text, text[-3000:]
    assert re.search(r"rank 1 .*exits", text), text[-2000:]


def test_gpu_ids_take_gpu_zero_and_refuse_negative_indices():
    # An elastic TP=2 worker is started with --gpu-ids 0,1; the flag once shared the batch-size parser (">= 1").
    from foundry_sglang.engine.flags import build_arg_parser

    assert build_arg_parser().parse_args(["--gpu-ids", "0,1"]).gpu_ids == [0, 1]
    assert build_arg_parser().parse_args(["--gpu-ids", "1 0"]).gpu_ids == [1, 0]
    assert_one_line(*launch("--device", "cpu", "--port", "0", "--gpu-ids", "0,-1", module="foundry_sglang.engine"),
                    "GPU indices must be 0 or more")
