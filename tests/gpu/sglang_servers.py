"""The SGLang servers of the GPU checks and benchmarks: model directories, flags, one server process, requests
and what its log and ``/server_info`` say (check_sglang_server.py, elastic_switches.py, bench/sglang_start.py).

Servers run in their own process group and are killed at exit (``kill_all``).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Flags measured to serve on an H200 with SGLang 0.5.17 (docs/STAGING.md): no FlashAttention-3 in the
#: trimmed kernel wheel, no flashinfer sampling/grammar, no custom all-reduce, dummy weights, no tokenizer.
SERVER_FLAGS = ["--load-format", "dummy", "--attention-backend", "triton", "--sampling-backend", "pytorch",
                "--grammar-backend", "none", "--disable-custom-all-reduce", "--mem-fraction-static", "0.3",
                "--mm-feature-transport", "cpu", "--skip-server-warmup", "--skip-tokenizer-init",
                "--random-seed", "0", "--host", "127.0.0.1", "--log-level", "info"]
PREFILL_PIN = ["--cuda-graph-backend-prefill", "disabled"]  # what foundry_sglang.launch adds by itself
#: Memory flags when several servers (or several ranks) share a GPU: a fixed KV pool instead of a memory share
#: (SGLang sizes the pool from the memory free when it profiles, which other processes on the GPU change).
SHARED_MEMORY_FLAGS = ["--mem-fraction-static", "0.85", "--max-total-tokens", "65536"]

MODELS = {
    # Qwen3-8B's shapes with fewer layers.
    "dense": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
              "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
              "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
              "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645},
    # A small Qwen3-MoE (Qwen3-30B-A3B's attention and expert shapes, fewer experts and layers).
    "moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
            "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 32, "num_experts_per_tok": 8,
            "decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [], "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "hidden_act": "silu", "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645},
}
# Qwen3-30B-A3B's shapes, all 128 experts (fewer layers when asked).
MODELS["a3b"] = dict(MODELS["moe"], num_experts=128)

_servers: list[subprocess.Popen] = []


def kill_all() -> None:
    for proc in _servers:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass
    deadline = time.time() + 10
    for proc in _servers:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass


atexit.register(kill_all)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def write_model(root: Path, kind: str, layers: int) -> Path:
    path = root / f"qwen3-{kind}-{layers}l"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(MODELS[kind], num_hidden_layers=layers), indent=1))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return path


class Server:
    """One SGLang server process (own process group), its log and its base URL."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, port: int):
        self.name, self.log, self.base = name, log, f"http://127.0.0.1:{port}"
        self.fh = open(log, "w")
        self.t0, self.t_launch = time.perf_counter(), time.time()  # the launch: clock for intervals, wall clock
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        _servers.append(self.proc)

    def wait_healthy(self, timeout: float, poll: float = 0.1) -> float:
        """Seconds from the launch to the first ``/health`` 200, asked every ``poll`` seconds."""
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.last_error()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.t0
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(poll)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s: {self.last_error()}")

    def text(self) -> str:
        if not self.fh.closed:
            self.fh.flush()
        return self.log.read_text(errors="replace")

    def last_error(self) -> str:
        lines = [x for x in self.text().splitlines() if "Error" in x or "error" in x]
        return (lines[-1] if lines else (self.text().splitlines() or ["(empty log)"])[-1])[:300]

    def stop(self, grace: float = 15) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left of it after ``grace`` seconds; returns
        once the group is gone (schedulers included, so that their GPU memory is free for the next server)."""
        _signal_group(self.proc.pid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and _group_alive(self.proc.pid):
            self.proc.poll()  # reap the leader once it exits
            time.sleep(0.1)
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.fh.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:  # the group is gone
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which hold no GPU memory, do not count: an init
    that does not reap would keep them forever)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except OSError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if group == str(pgid) and state not in ("Z", "X"):
            return True
    return False


def server_env(gpu: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_")}
    env.update(CUDA_VISIBLE_DEVICES=str(gpu), NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", PYTHONUNBUFFERED="1", SGLANG_IS_FLASHINFER_AVAILABLE="false",
               SGLANG_LOG_MS="1")  # log times in milliseconds: bench/sglang_start.py splits the start by them
    return env  # plain SGLang: the plugin is installed but idle without FOUNDRY_MODE/FOUNDRY_ARCHIVE


def start_server(name: str, model: Path, out: Path, gpu: int, mode: str | None, archive: Path | None,
                 extra: list[str] = (), share: bool = False, env: dict | None = None) -> Server:
    """``mode`` None: plain SGLang (through the launcher with Foundry off when ranks share a GPU: SGLang alone
    cannot put two ranks on one GPU). ``env``: variables set over ``server_env(gpu)``."""
    port = free_port()
    flags = SERVER_FLAGS + (SHARED_MEMORY_FLAGS if share else [])
    common = ["--model-path", str(model), "--port", str(port), *flags, *extra]
    ranks_share = ["--foundry-ranks-share-gpu"] if share else []
    if mode is None and not share:
        cmd = [sys.executable, "-m", "sglang.launch_server", *common, *PREFILL_PIN]
    elif mode is None:
        cmd = [sys.executable, "-m", "foundry_sglang.launch", "--foundry-engine", "sglang", "--foundry-mode", "off",
               *ranks_share, *common, *PREFILL_PIN]
    else:
        cmd = [sys.executable, "-m", "foundry_sglang.launch", "--foundry-engine", "sglang", "--foundry-mode", mode,
               "--foundry-archive", str(archive), *ranks_share, *common]
    return Server(name, cmd, dict(server_env(gpu), **(env or {})), out / f"{name}.log", port)


# -- measurements ------------------------------------------------------------------------------------------------
def prompts(n: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(1234)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(rng.randrange(8, 65))] for _ in range(n)]


def generate(base: str, ids: list[int], max_new: int) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new,
                                                  "ignore_eos": True}}
    return http(base + "/generate", body, timeout=300)


def stream_marks(base: str, ids: list[int], max_new: int, timeout: float = 300) -> list[tuple[float, int]]:
    """Stream one greedy ``/generate`` request: (``time.perf_counter()``, tokens generated so far) at each chunk."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True}}
    req = urllib.request.Request(base + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    marks = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue  # blank separators and the final "data: [DONE]"
            t = time.perf_counter()
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            marks.append((t, int(chunk["meta_info"]["completion_tokens"])))
    return marks


def greedy_answers(base: str, ids: list[list[int]], max_new: int) -> list[list[int]]:
    with ThreadPoolExecutor(len(ids)) as pool:
        return [r["output_ids"] for r in pool.map(lambda x: generate(base, x, max_new), ids)]


def decode_throughput(base: str, streams: int, max_new: int, vocab: int) -> float:
    ids = prompts(streams, vocab)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        outs = list(pool.map(lambda x: generate(base, x[:16], max_new), ids))
    return sum(len(o["output_ids"]) for o in outs) / (time.perf_counter() - t0)


def server_info(base: str) -> dict:
    for path in ("/server_info", "/get_server_info"):
        try:
            return http(base + path, timeout=30)
        except Exception:
            continue
    return {}


def startup_fields(info: dict) -> dict:
    st = info.get("startup_time") or {}
    if isinstance(st, dict) and "scheduler" in st and isinstance(st["scheduler"], dict):
        st = dict(st, **st["scheduler"])
    keep = {}
    for key in ("load_weight", "kv_cache_allocation", "scheduler_e2e"):
        if key in st:
            keep[key] = round(float(st[key]), 2)
    graphs = st.get("cuda_graph")
    if isinstance(graphs, dict):
        keep["cuda_graph"] = {k: round(float(v), 2) for k, v in graphs.items()}
    return keep


def graph_facts(text: str) -> dict:
    facts = {}
    m = re.search(r"Capture target decode CUDA graph begin\..*?bs=\[([0-9, ]*)\]", text)
    if m:
        facts["bs"] = [int(x) for x in m.group(1).split(",") if x.strip()]
    m = re.search(r"Capture target decode CUDA graph end\. elapsed=([0-9.]+) s", text)
    if m:
        facts["decode_graph_phase_s"] = float(m.group(1))
    m = re.findall(r"foundry: mode=(\w+) recorded=(\d+) restored=(\d+) live=(\d+)", text)
    if m:  # one summary line per rank: every rank must have done the same
        mode, rec, res, live = m[-1]
        facts.update(foundry_mode=mode, recorded=int(rec), restored=int(res), live=int(live),
                     ranks_reported=len(m), ranks_agree=len(set(m)) == 1)
    m = re.search(r"foundry: filled (\d+) collective slots in (\d+) graphs", text)
    if m:
        facts["slots_filled_at_save"] = int(m.group(1))
    m = re.search(r"foundry: rank template (\S+) written \((.*)\)", text)
    if m:
        facts["template"] = m.group(2)[:200]
    m = re.search(r"foundry: (SAVE|LOAD) (\S+)", text)
    if m:
        facts["chose"], facts["archive"] = m.group(1), m.group(2)
    m = re.search(r"foundry: restored (\d+) graphs in ([0-9.]+) s", text)
    if m:
        facts["restore_s"] = float(m.group(2))
    m = re.search(r"foundry: all (\d+) graphs ready ([0-9.]+)s after restore\(\) began", text)
    if m:  # restore() returns once the first graph is ready; the others are instantiated in the background
        facts["all_graphs_ready_s"] = float(m.group(2))
    m = re.search(r"foundry: first restored graph \((\S+)\) handed to the engine ([0-9.]+) s after", text)
    if m:
        facts["first_install_s"] = float(m.group(2))
    m = re.search(r"foundry: until it asked, the engine was in \((\d+) samples\): (.*)", text)
    if m:  # where SGLang's thread was between the restore and its first request for a graph
        facts["engine_wait"] = m.group(2).strip()[:400]
    facts["fallback_lines"] = [x.split("foundry:", 1)[1].strip()[:200] for x in text.splitlines()
                               if "foundry:" in x and ("not used" in x or "capturing CUDA graphs live" in x)]
    facts["tracebacks"] = text.count("Traceback (most recent call last)")
    return facts

