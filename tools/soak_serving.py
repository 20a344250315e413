"""Soak test of the serving path: valid, malformed and disconnecting clients while replicas die and TP switches.

Runs a CPU elastic deployment of ``builtin:tiny`` (local backend by default, ``--backend ray`` for Ray) on
loopback, for a bounded time. Meanwhile:

- valid clients send greedy completions and chat requests (streaming and not) and compare every answer with the
  reference taken before the chaos starts: a different answer is *wrong*, no answer is *failed*;
- malformed clients send broken JSON, deep JSON, integers of 5000 digits, wrong types, out-of-range values,
  unknown roles: each must get a 4xx (a 2xx is *wrong*, a 5xx *failed*);
- disconnecting clients leave mid-stream, right after ``[DONE]``, before the answer, or mid-headers;
- half-open connections are opened and never finished;
- the layout is switched TP 1 x 2 replicas -> TP 2 -> TP 1 x 2 -> TP 2, and a serving engine is SIGKILLed as
  each switch starts;
- between switches, a chaos loop SIGKILLs a random serving engine every ``--kill-every`` seconds, outside any
  switch, and times its replacement: from the kill until ``/health`` is ``ok`` again (every declared replica
  serves) without the killed process.

It prints ``requests ok / failed / wrong``, failures by cause, the kills and replacement times, the controller's
engine restarts and switches, and tracebacks found in the engine logs. Exit status 0 when nothing is wrong, every
failure was caused by its client and every engine killed outside a switch was replaced. Run:
``python3 tools/soak_serving.py --seconds 90``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Dict, Optional, Tuple

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from openai_client import openai_request  # noqa: E402

from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment  # noqa: E402

PROMPTS = [f"soak prompt {i}: the quick brown fox" for i in range(5)]
MAX_TOKENS = 10

MALFORMED = [  # (path, raw body)
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[" * 50_000 + b"]" * 50_000),
    ("/v1/completions", json.dumps({"prompt": "x", "seed": 2 ** 63}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "top_k": 2 ** 63}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "stream": "yes"}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "ignore_eos": "false"}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10 ** 6}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "stop": ["a"] * 10_000}).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 3}).encode()),
    ("/v1/completions", json.dumps([1, 2, 3]).encode()),
    ("/v1/completions", json.dumps({"prompt": "x", "model": []}).encode()),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("/reconfigure", b'{"tp": ' + b"1" * 5000 + b"}"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [], "stream_options": "yes"}).encode()),
]


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.wrong: Counter = Counter()
        self.failed: Counter = Counter()     # cause -> count
        self.examples: Dict[str, str] = {}

    def fail(self, cause: str, detail: str = "") -> None:
        self.failed[cause] += 1
        self.examples.setdefault(cause, detail[:300])

    def bad(self, cause: str, detail: str = "") -> None:
        self.wrong[cause] += 1
        self.examples.setdefault("wrong: " + cause, detail[:300])


def _body(i: int, stream: bool) -> Tuple[dict, bool]:
    chat = i % 3 == 0
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}
    prompt = PROMPTS[i % len(PROMPTS)]
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body, chat


async def _valid(session, url, i: int, stream: bool) -> Tuple[Optional[str], Optional[str]]:
    body, chat = _body(i, stream)
    return await openai_request(session, url, body, chat=chat)


async def reference(url: str) -> Dict[Tuple[int, bool], str]:
    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for i in range(len(PROMPTS) * 3):
            for stream in (False, True):
                text, err = await _valid(s, url, i, stream)
                if err:
                    raise RuntimeError(f"reference request failed: {err}")
                out[(i % (len(PROMPTS) * 3), stream)] = text
    return out


def _raw(url: str, payload: bytes, read_until: Optional[bytes], rst: bool) -> None:
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=60)
    try:
        s.sendall(payload)
        seen = b""
        while read_until is not None and read_until not in seen:
            chunk = s.recv(65536)
            if not chunk:
                break
            seen += chunk
        if rst:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        s.close()


def _post(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


async def client_loop(kind: str, url: str, ref, tally: Tally, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        while not stop.is_set():
            i = rng.randrange(len(PROMPTS) * 3)
            stream = rng.random() < 0.5
            try:
                if kind == "valid":
                    text, err = await _valid(s, url, i, stream)
                    if err:
                        tally.fail("server", err)
                    elif text != ref[(i, stream)]:
                        tally.bad("valid request", f"{text!r} != {ref[(i, stream)]!r}")
                    else:
                        tally.ok += 1
                elif kind == "malformed":
                    path, raw = rng.choice(MALFORMED)
                    async with s.post(url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                        body = await r.text()
                    await asyncio.sleep(0.05)
                    if 400 <= r.status < 500:
                        tally.fail("client: malformed request rejected (4xx)")
                    elif r.status < 400:
                        tally.bad("malformed request accepted", f"{raw[:80]!r} -> {r.status} {body[:100]}")
                    else:
                        tally.fail("server", f"malformed {raw[:80]!r} -> {r.status} {body[:200]}")
                elif kind == "disconnect":
                    mode = rng.randrange(4)
                    long = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 200, "temperature": 0,
                            "ignore_eos": True}
                    if mode == 0:     # mid-stream
                        await loop.run_in_executor(None, _raw, url, _post({**long, "stream": True}), b"data:", True)
                    elif mode == 1:   # right after [DONE]
                        body, _ = _body(i, True)
                        body.setdefault("prompt", PROMPTS[0])
                        body.pop("messages", None)
                        await loop.run_in_executor(None, _raw, url, _post(body), b"[DONE]", True)
                    elif mode == 2:   # before the (non-streamed) answer
                        await loop.run_in_executor(None, _raw, url, _post(long), None, False)
                    else:             # mid-headers
                        await loop.run_in_executor(None, _raw, url, b"POST /v1/completions HTTP/1.1\r\nHo", None,
                                                   True)
                    tally.fail("client: disconnected on purpose")
                    await asyncio.sleep(0.05)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                if kind == "disconnect":
                    tally.fail("client: disconnected on purpose")
                else:
                    tally.fail("server", f"{kind}: {type(exc).__name__}: {exc}")


def half_open(url: str, n: int) -> list:
    host, port = url.split("//")[1].split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"GET /health HTTP/1.1\r\n")   # never finished
        socks.append(s)
    return socks


def serving_pids(dep: ElasticDeployment) -> list:
    """Engine processes of the generation that serves (a replica of a generation still starting is left alone,
    so that switches can also succeed; killing those is covered by tests/elastic/test_elastic_ray.py)."""
    return [r["pid"] for g in dep.status()["generations"] if g["state"] == "active"
            for r in g["replicas"] if r.get("pid")]


def _kill_one(dep: ElasticDeployment, rng: random.Random, log, why: str) -> Optional[int]:
    pids = serving_pids(dep)
    if not pids:
        return None
    pid = rng.choice(pids)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    log(f"killed engine pid {pid} ({why})")
    return pid


def _replaced(dep: ElasticDeployment, url: str, pid: int) -> bool:
    """The killed engine is gone from the serving generation and every declared replica serves again."""
    if dep.status()["job"] is not None or pid in serving_pids(dep):
        return False
    return _get(url + "/health").startswith('200 {"status": "ok"')


def chaos(dep: ElasticDeployment, url: str, seconds: float, kill_every: float, log,
          stop: threading.Event) -> Dict[str, Any]:
    """Switch TP at 1/4, 1/2 and 3/4 of the time, killing a serving engine as each switch starts; between switches
    kill a serving engine every ``kill_every`` s and time its replacement. A kill that is due goes first and no
    switch starts while an engine is being replaced, so these kills are always outside a switch."""
    rng = random.Random(7)
    t0 = time.monotonic()
    out: Dict[str, Any] = {"kills_in_switches": 0, "kills_outside": 0, "replacements_s": []}
    switches = [(seconds / 4, {"tp": 2, "replicas": 1}), (seconds / 2, {"tp": 1, "replicas": 2}),
                (3 * seconds / 4, {"tp": 2, "replicas": 1})]
    next_kill = t0 + kill_every
    pending_job = None
    replacing: Optional[Tuple[int, float]] = None    # (pid killed, when)
    waiting = False

    def check_replacement(now: float) -> None:
        nonlocal replacing, next_kill
        if replacing is not None and _replaced(dep, url, replacing[0]):
            took = now - replacing[1]
            out["replacements_s"].append(took)
            log(f"engine pid {replacing[0]} replaced {took:.1f}s after its kill")
            replacing = None
            next_kill = max(next_kill, now + 2.0)

    while not stop.is_set() and time.monotonic() - t0 < seconds:
        now = time.monotonic()
        check_replacement(now)
        kill_due = pending_job is None and replacing is None and now >= next_kill
        if kill_due and dep.status()["job"] is None:   # before a switch that is late: kills outside switches
            pid = _kill_one(dep, rng, log, "outside a switch")
            if pid:
                out["kills_outside"] += 1
                replacing = (pid, now)
            next_kill = now + kill_every
        elif not kill_due and replacing is None and switches and now - t0 >= switches[0][0] and pending_job is None:
            try:
                pending_job = dep._call("submit", switches[0][1])
                log(f"switch to {switches[0][1]} submitted (job {pending_job['id']})")
                waiting = False
                switches.pop(0)
                if _kill_one(dep, rng, log, "as the switch starts"):
                    out["kills_in_switches"] += 1
            except Exception as exc:  # busy with a repair: try again shortly
                if not waiting:
                    log(f"switch not accepted yet: {type(exc).__name__}: {exc}")
                waiting = True
        if pending_job is not None:
            job = dep.job(pending_job["id"])
            if job["state"] != "running":
                log(f"switch {job['from']} -> {job['to']}: {job['state']} ({job['strategy']}) in "
                    f"{job['total_s']:.1f}s {job.get('error') or ''}")
                pending_job = None
                next_kill = max(next_kill, time.monotonic() + 2.0)
        time.sleep(0.25)
    deadline = time.monotonic() + 300
    while (pending_job is not None or replacing is not None) and time.monotonic() < deadline:
        check_replacement(time.monotonic())
        if pending_job is not None:
            job = dep.job(pending_job["id"])
            if job["state"] != "running":
                log(f"switch {job['from']} -> {job['to']}: {job['state']} ({job['strategy']})")
                pending_job = None
        time.sleep(0.25)
    out["unreplaced"] = int(replacing is not None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=90.0, help="length of the chaos phase (default 90)")
    p.add_argument("--backend", choices=["local", "ray"], default="local", help="worker backend (default local)")
    p.add_argument("--kill-every", type=float, default=15.0,
                   help="seconds between engine kills outside switches (default 15; one more as each switch starts)")
    p.add_argument("--valid", type=int, default=4, help="concurrent valid clients (default 4)")
    p.add_argument("--malformed", type=int, default=2, help="concurrent malformed clients (default 2)")
    p.add_argument("--disconnect", type=int, default=2, help="concurrent disconnecting clients (default 2)")
    p.add_argument("--half-open", type=int, default=50, help="half-open connections held (default 50)")
    args = p.parse_args(argv)
    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    logs = tempfile.mkdtemp(prefix="foundry-soak-")
    if args.backend == "ray":
        import ray
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = DeploymentConfig(model="builtin:tiny", slots=2, tp=1, replicas=2, backend=args.backend, port=0,
                           device="cpu", log_dir=logs, env={"OMP_NUM_THREADS": "1"},
                           extra_args=["--num-kv-pages", "256", "--max-running-requests", "16"],
                           start_timeout=240, queue_timeout=240, drain_timeout=60)
    dep = ElasticDeployment(cfg)
    tally = Tally()
    try:
        url = dep.start()
        log(f"deployment up at {url} (backend {args.backend}, logs in {logs})")
        ref = asyncio.run(reference(url))
        log(f"reference taken: {len(ref)} answers")
        socks = half_open(url, args.half_open)
        stop_chaos = threading.Event()
        result: Dict[str, Any] = {}
        chaos_thread = threading.Thread(
            target=lambda: result.update(chaos(dep, url, args.seconds, args.kill_every, log, stop_chaos)),
            daemon=True)

        async def load():
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(client_loop(kind, url, ref, tally, stop, seed))
                     for seed, kind in enumerate(["valid"] * args.valid + ["malformed"] * args.malformed
                                                 + ["disconnect"] * args.disconnect)]
            chaos_thread.start()
            while chaos_thread.is_alive():
                await asyncio.sleep(0.5)
            # let the deployment settle (replacements healthy), then a last valid round must all succeed
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 600)

        asyncio.run(load())
        closed = sum(_closed(s) for s in socks)
        status = dep.status()
        health = _get(url + "/health")
    finally:
        dep.stop()
        if args.backend == "ray":
            import ray
            ray.shutdown()
    tracebacks = sum(open(os.path.join(logs, f), errors="replace").read().count("Traceback")
                     for f in os.listdir(logs))
    client = sum(n for cause, n in tally.failed.items() if cause.startswith("client"))
    server = sum(n for cause, n in tally.failed.items() if not cause.startswith("client"))
    wrong = sum(tally.wrong.values())
    print()
    print(f"soak: {args.seconds:.0f}s of chaos, backend {args.backend}, builtin:tiny on CPU, 2 slots; "
          f"{args.valid} valid, {args.malformed} malformed, {args.disconnect} disconnecting clients, "
          f"{args.half_open} half-open connections")
    print(f"requests ok {tally.ok} / failed {client + server} / wrong {wrong}")
    for cause, n in sorted(tally.failed.items()):
        print(f"  failed: {n:6d}  {cause}")
    for cause, n in sorted(tally.wrong.items()):
        print(f"  wrong:  {n:6d}  {cause}")
    times = sorted(result.get("replacements_s", []))
    print(f"engines killed: {result.get('kills_outside', 0)} outside switches, {result.get('kills_in_switches', 0)} "
          f"as a switch started; replaced outside switches: {len(times)}"
          + (f" in {', '.join(f'{t:.1f}' for t in times)} s (median {times[len(times) // 2]:.1f} s)" if times else "")
          + f"; engine restarts (replicas replaced by the controller): {status['restarts']}; "
            f"switches: {status['switches']}")
    print(f"final layout {status['layout']}, /health {health}; half-open connections closed by the server: "
          f"{closed}/{len(socks)}; tracebacks in engine logs: {tracebacks}")
    for cause, ex in tally.examples.items():
        if not cause.startswith("client"):
            print(f"  example ({cause}): {ex}")
    verdict = wrong == 0 and server == 0 and tally.ok > 0 and not result.get("unreplaced", 1)
    print("VERDICT:", "PASS (0 wrong, every failure caused by its client)" if verdict else "FAIL")
    return 0 if verdict else 1


def _closed(s: socket.socket) -> bool:
    s.settimeout(1.0)
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True
    except OSError:
        return False
    finally:
        s.close()


def _get(url: str) -> str:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return f"{r.status} {r.read().decode()[:120]}"
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read().decode()[:120]}"


if __name__ == "__main__":
    sys.exit(main())
