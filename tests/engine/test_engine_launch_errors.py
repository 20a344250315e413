"""Launch problems are one line and an exit status, never a traceback."""
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


def _rank_pids(pid):
    """The rank processes (> 0) a TP server started (multiprocessing spawn children)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read():
                        out.append(int(child))
    return out


def _tp2_server_mid_decode(act):
    """Start a TP=2 CPU server in its own process group, stream long generations, then ``act(proc, url)`` in the
    middle of decoding; returns everything the server group wrote to stderr once it has exited."""
    import re
    import threading
    import time

    import requests

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "foundry_sglang.engine", "--tp", "2", "--device", "cpu",
                             "--port", "0", "--num-kv-pages", "64"], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
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
        def stream():
            try:
                requests.post(url + "/v1/completions", timeout=120, json={
                    "prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True})
            except requests.RequestException:   # the server went away: expected here
                pass

        for _ in range(2):
            threading.Thread(target=stream, daemon=True).start()
        time.sleep(1.0)
        act(proc, url)
        proc.wait(120)
        reader.join(60)      # stderr closes when every rank (which inherited it) has exited
        assert not reader.is_alive(), "a rank did not exit"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return "".join(lines)


def test_the_other_rank_of_a_killed_engine_exits_with_one_line():
    """SIGKILL rank 0 of a TP=2 server in the middle of generating: rank 1 loses its peer inside a collective and
    must say so in one line, not a traceback."""
    import re
    import signal

    text = _tp2_server_mid_decode(lambda proc, url: proc.send_signal(signal.SIGKILL))
    assert "Traceback" not in text, text[-3000:]
    assert re.search(r"rank 1 .*exits", text), text[-2000:]


def test_a_tp2_server_stopped_mid_decode_exits_quietly():
    """SIGTERM to the whole process group (as a supervisor stops a server) in the middle of decoding: rank 0
    finishes its step and tells rank 1 to exit; no traceback and no error line."""
    import signal

    text = _tp2_server_mid_decode(lambda proc, url: os.killpg(proc.pid, signal.SIGTERM))
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    assert "shutting down" in text


def test_a_rank_killed_mid_decode_is_one_line_and_the_server_reports_unhealthy():
    import signal

    import requests

    def kill_rank1(proc, url):
        (rank1,) = _rank_pids(proc.pid)
        os.kill(rank1, signal.SIGKILL)
        for _ in range(600):      # the engine loop notices at its next step
            if requests.get(url + "/health", timeout=10).status_code == 503:
                break
        assert requests.get(url + "/health", timeout=10).status_code == 503
        os.killpg(proc.pid, signal.SIGTERM)

    text = _tp2_server_mid_decode(kill_rank1)
    notes = [line for line in text.splitlines() if " ERROR " in line or " WARNING " in line]
    assert "Traceback" not in text, text[-3000:]
    assert len(notes) == 1 and "rank 1 exited with status -9" in notes[0], text[-3000:]


def test_gpu_ids_take_gpu_zero_and_refuse_negative_indices():
    # An elastic TP=2 worker is started with --gpu-ids 0,1; the flag once shared the batch-size parser (">= 1").
    from foundry_sglang.engine.flags import build_arg_parser

    assert build_arg_parser().parse_args(["--gpu-ids", "0,1"]).gpu_ids == [0, 1]
    assert build_arg_parser().parse_args(["--gpu-ids", "1 0"]).gpu_ids == [1, 0]
    assert_one_line(*launch("--device", "cpu", "--port", "0", "--gpu-ids", "0,-1", module="foundry_sglang.engine"),
                    "GPU indices must be 0 or more")


def test_ranks_that_share_a_gpu_need_only_that_gpu():
    # An elastic TP=2 worker on one GPU is started with --gpu-ids 0,0; counting ranks instead of the GPUs they
    # name refused it ("need 2 GPUs; 1 visible") and the switch rolled back.
    from foundry_sglang.engine.config import EngineArgs
    from foundry_sglang.engine.server import gpu_count_problem

    assert gpu_count_problem(EngineArgs(model="builtin:tiny", tp=2, gpu_ids=[0, 0]), visible=1) is None
    assert gpu_count_problem(EngineArgs(model="builtin:tiny", tp=2, gpu_ids=[1, 0]), visible=2) is None
    assert "needs 2 GPUs; 1 visible" in gpu_count_problem(EngineArgs(model="builtin:tiny", tp=2), visible=1)
    assert "--gpu-ids 0,1: needs 2 GPUs" in gpu_count_problem(EngineArgs(model="builtin:tiny", ep=2, gpu_ids=[0, 1]),
                                                              visible=1)


def test_ranks_that_share_a_gpu_split_its_kv_memory():
    # Each rank of an elastic TP=2 worker on one GPU sized its KV pool from the whole GPU (55 GiB of an H100's 79)
    # and the second rank ran out of memory. Virtual ranks captured alone size it the same way, so an archive's
    # pool fits the layout it is loaded into.
    from foundry_sglang.engine.config import EngineArgs
    from foundry_sglang.engine.model_runner import gpu_kv_pages

    gib, page = 2 ** 30, 2 ** 20
    alone = gpu_kv_pages(EngineArgs(model="builtin:tiny", tp=2), 1, 70 * gib, 80 * gib, page)
    shared = [gpu_kv_pages(EngineArgs(model="builtin:tiny", tp=2, gpu_ids=[0, 0]), r, 70 * gib, 80 * gib, page)
              for r in (0, 1)]
    assert alone == (70 - 12 - 4) * 1024
    assert shared[0] == shared[1] == (70 - 12 - 8) * 1024 // 2
    assert sum(shared) * page + 12 * gib + 8 * gib <= 70 * gib


def test_a_rank_that_cannot_start_says_so_in_one_line(tmp_path):
    # A rank > 0 that failed while building its runner (out of memory on a shared GPU, say) printed a traceback.
    code = ("from foundry_sglang.engine.config import EngineArgs\n"
            "from foundry_sglang.engine.engine import worker_main\n"
            f"worker_main(EngineArgs(model={str(tmp_path / 'absent')!r}, tp=2, device='cpu'), 1)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert [line for line in out.stderr.splitlines() if "rank 1 cannot start" in line], out.stderr[-2000:]
