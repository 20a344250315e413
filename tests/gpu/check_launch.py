"""GPU check of the product path: `python -m foundry_sglang.launch` twice on the built-in engine.

    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_launch.py [--layers N] [--out DIR]

Start 1 (empty archive dir, --foundry-mode auto) captures the decode graphs and saves them; start 2 restores them.
Each start serves the same greedy requests over HTTP; answers must be identical, and we report the time from
process start to a healthy server and the engine's own graph-phase time from its log. Verdict table last.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for --help without PYTHONPATH

from foundry_sglang.proc import free_port

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [f"Request {i}: the quick brown fox" for i in range(8)]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def start(model: str, archive: Path, log: Path) -> dict:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=36, help="layers of the qwen3-8b-shaped preset")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/foundry-launch"), help="directory for logs")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    archive = Path("/tmp/foundry-launch-archives")
    shutil.rmtree(archive, ignore_errors=True)
    # A 320-token vocabulary keeps most generated ids printable bytes, so answers compare as text.
    model = f"builtin:qwen3-8b?num_hidden_layers={a.layers}&vocab_size=320"
    first = start(model, archive, out / "launch_first.log")
    second = start(model, archive, out / "launch_second.log") if first["ok"] else {"ok": False}
    rows = []

    def graph_line(log: str) -> str:
        text = (out / log).read_text()
        m = re.findall(r"(\d+) decode graphs ready in ([0-9.]+) s", text)
        mode = re.findall(r"foundry: session (\w+)", text)
        return f"{mode[-1] if mode else '?'}; graphs {m[-1][1] + ' s' if m else '?'}"

    rows.append(("start 1 (auto -> SAVE)", "ok" if first["ok"] else "FAIL",
                 f"healthy after {first.get('ready_s', 0):.1f}s; {graph_line('launch_first.log')}" if first["ok"]
                 else first.get("error", "")))
    rows.append(("start 2 (auto -> LOAD)", "ok" if second["ok"] else "FAIL",
                 f"healthy after {second.get('ready_s', 0):.1f}s; {graph_line('launch_second.log')}" if second["ok"]
                 else second.get("error", "")))
    if first["ok"] and second["ok"]:
        same = sum(x == y for x, y in zip(first["answers"], second["answers"]))
        rows.append(("sequential greedy answers identical", "PASS" if same == len(PROMPTS) else "FAIL",
                     f"{same}/{len(PROMPTS)}; e.g. {first['answers'][0][:40]!r}"))
        conc = sum(x == y for x, y in zip(first["concurrent"], second["concurrent"]))
        rows.append(("concurrent greedy answers identical", "info",
                     f"{conc}/{len(PROMPTS)} (batch shapes differ with arrival timing; bf16 near-ties may flip)"))
    (out / "check_launch.json").write_text(json.dumps({"first": first, "second": second}, indent=1))
    print(f"\n=== launch check ({model}) ===")
    for name, verdict, detail in rows:
        print(f"{verdict:5} | {name:40} | {detail}")
    return 0 if all(verdict != "FAIL" for _, verdict, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
