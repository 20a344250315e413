"""Starts of the product path for test_launch.py: ``python -m foundry_sglang.launch`` on the built-in engine, its
time to a healthy server and its greedy answers over HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from foundry_sglang.proc import free_port

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [f"Request {i}: the quick brown fox" for i in range(8)]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def start(model: str, archive: Path, log: Path) -> dict:
    """One start with ``--foundry-mode auto``: {"ok", "ready_s", "answers" (one request at a time), "concurrent"}
    or {"ok": False, "error", "log"}; the server is stopped before it returns."""
    port = free_port()
    cmd = [sys.executable, "-m", "foundry_sglang.launch", "--foundry-engine", "builtin", "--foundry-archive",
           str(archive), "--foundry-mode", "auto", "--model", model, "--device", "cuda", "--port", str(port),
           "--num-kv-pages", "2048", "--max-running-requests", "256"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    ready = None
    try:
        while time.perf_counter() - t0 < 240 and proc.poll() is None:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        ready = time.perf_counter() - t0
                        break
            except OSError:
                time.sleep(0.2)
        if ready is None:
            return {"ok": False, "error": f"not healthy (rc={proc.poll()})", "log": log.read_text()[-2000:]}
        def ask(p):
            return post(base + "/v1/completions", {"model": model, "prompt": p, "max_tokens": 24,
                                                   "temperature": 0})["choices"][0]["text"]

        sequential = [ask(p) for p in PROMPTS]  # one at a time: the same batch shapes in both starts
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(ask, PROMPTS))  # batch composition depends on arrival timing
        return {"ok": True, "ready_s": ready, "answers": sequential, "concurrent": concurrent}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
