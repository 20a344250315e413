"""Engine workers: one engine server process per replica, behind one interface.

A worker launches an OpenAI-compatible server on a free loopback port and reports its URL. Rank 0 of the
server spawns its other TP/EP ranks itself, so one worker owns ``tp * ep`` slots. Two kinds:

- ``builtin``: ``python -m foundry_sglang.engine`` (the compact built-in engine; gloo on CPU, NCCL on GPU);
- ``sglang``: ``python -m foundry_sglang.launch`` with SGLang arguments and the Foundry plugin enabled.

``ProcessWorker`` is the plain implementation; the Ray backend hosts one inside an actor placed in the
generation's placement group, the local backend uses it directly.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Sequence

from foundry_sglang.graphs.settings import FoundryConfig
from foundry_sglang.proc import EXIT_WITH_PARENT_ENV, STANDBY_READY_FD_ENV, disable_nvls, free_port

log = logging.getLogger("foundry_sglang.elastic.workers")

WORKER_KINDS = ("builtin", "sglang")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class WorkerSpec:
    """Everything needed to launch one replica's engine server."""

    model: str
    tp: int = 1
    ep: int = 1
    kind: str = "builtin"
    device: str = "cpu"                       # "cpu" or "cuda"
    foundry: FoundryConfig = field(default_factory=FoundryConfig)  # mode and this layout's archive directory
    extra_args: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    log_path: Optional[str] = None            # engine stdout/stderr go here (default: inherited)

    def __post_init__(self) -> None:
        if isinstance(self.foundry, Mapping):  # from a plain dict (a Ray actor's argument, YAML)
            self.foundry = FoundryConfig.from_dict(self.foundry)

    def to_dict(self) -> Dict:
        return dict(self.__dict__)


def build_command(spec: WorkerSpec, port: int) -> List[str]:
    """The command line that starts ``spec``'s server on ``port``."""
    if spec.kind == "builtin":
        cmd = [sys.executable, "-m", "foundry_sglang.engine", "--model", spec.model,
               "--tp", str(spec.tp), "--ep", str(spec.ep), "--host", spec.host, "--port", str(port),
               "--device", spec.device]
    elif spec.kind == "sglang":
        cmd = [sys.executable, "-m", "foundry_sglang.launch", "--model-path", spec.model,
               "--tp-size", str(spec.tp), "--ep-size", str(spec.ep), "--host", spec.host, "--port", str(port)]
    else:
        raise ValueError(f"unknown worker kind {spec.kind!r}; expected one of {', '.join(WORKER_KINDS)}")
    return cmd + spec.foundry.engine_flags() + list(spec.extra_args)


_SECRET_FLAG_WORDS = ("key", "token", "secret", "password")


def printable_command(cmd: Sequence[str]) -> str:
    """``cmd`` for logs, with the values of secret-looking flags (``--api-key``, ``--hf-token``, ...) masked."""
    def secret(flag: str) -> bool:
        return flag.startswith("-") and any(word in flag.lower() for word in _SECRET_FLAG_WORDS)

    out, mask_next = [], False
    for arg in cmd:
        if mask_next:
            out.append("***")
            mask_next = False
        elif "=" in arg and secret(arg.split("=", 1)[0]):
            out.append(arg.split("=", 1)[0] + "=***")
        else:
            out.append(arg)
            mask_next = secret(arg)
    return " ".join(out)


def build_env(spec: WorkerSpec, gpu_ids: Sequence[int]) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    # The server must import this very checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env[EXIT_WITH_PARENT_ENV] = "1"  # the built-in engine stops if its worker dies (no orphaned servers)
    disable_nvls(env)  # also over a spec's own environment: NVLink multicast stays off in every engine
    if spec.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if spec.kind == "sglang":
        env.setdefault("SGLANG_PLUGINS", "foundry")
    return env


def distinct(ids: Sequence[int]) -> List[int]:
    """``ids`` without repeats, in order."""
    return list(dict.fromkeys(ids))


def rank_placement(spec: WorkerSpec, rank_gpus: Sequence[int], visible: Sequence[int]) -> List[str]:
    """Server flags that put rank r on GPU ``rank_gpus[r]`` (repeats share a GPU) of a process that sees
    ``visible`` (its CUDA_VISIBLE_DEVICES): the built-in engine's ``--gpu-ids``; SGLang's ``--base-gpu-id`` and
    ``--gpu-id-step``, or ``--foundry-ranks-share-gpu`` when every rank is on one GPU. Nothing where the ranks
    fall on the visible GPUs in order, or the spec already places them; ValueError where SGLang cannot."""
    pos = [list(visible).index(g) for g in rank_gpus]
    given = {a.split("=", 1)[0] for a in spec.extra_args}
    if spec.device != "cuda" or pos == list(range(len(pos))):
        return []
    if spec.kind == "builtin":
        return [] if "--gpu-ids" in given else ["--gpu-ids", ",".join(map(str, pos))]
    if given & {"--base-gpu-id", "--gpu-id-step", "--foundry-ranks-share-gpu"}:
        return []
    if len(pos) > 1 and len(set(pos)) == 1:
        return ["--base-gpu-id", str(pos[0]), "--foundry-ranks-share-gpu"]
    order = sorted(pos)
    step = order[1] - order[0] if len(order) > 1 else 1
    if step < 1 or order != list(range(order[0], order[0] + step * len(order), step)):
        raise ValueError(f"SGLang cannot put its ranks on GPUs {list(rank_gpus)}: they must be one GPU or "
                         "evenly spaced")
    return ["--base-gpu-id", str(order[0])] + (["--gpu-id-step", str(step)] if step > 1 else [])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def standby_command(spec: WorkerSpec, gpu_index: Optional[int] = None) -> List[str]:
    """The command line of a standby for ``spec``'s kind and device (it later takes ``build_command``'s
    arguments on stdin); ``gpu_index``: the visible GPU whose CUDA it initialises."""
    if spec.kind == "builtin":
        cmd = [sys.executable, "-m", "foundry_sglang.engine", "--standby", "--device", spec.device]
        return cmd + (["--gpu-ids", str(gpu_index)] if gpu_index is not None else [])
    if spec.kind == "sglang":
        cmd = [sys.executable, "-m", "foundry_sglang.plugin.standby", "--device", spec.device]
        if os.path.isfile(os.path.join(spec.model, "config.json")):
            cmd += ["--model-path", spec.model]      # its SGLang model file is imported ahead
        return cmd + (["--gpu", str(gpu_index)] if gpu_index is not None else [])
    raise ValueError(f"unknown worker kind {spec.kind!r}; expected one of {', '.join(WORKER_KINDS)}")


class ProcessWorker:
    """Runs one engine server as a child process (its own process group, so stop() reaches its ranks).

    ``start`` launches a fresh server. ``start_standby`` launches a warm process without a layout and
    ``activate`` later hands it one (through its stdin pipe); afterwards it is an ordinary running worker.
    """

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None
        self.spec: Optional[WorkerSpec] = None
        self._log_file = None
        self._ready_fd: Optional[int] = None     # standby only: the read end of its ready pipe
        self._ready = False

    def start(self, spec: WorkerSpec, port: Optional[int] = None, gpu_ids: Sequence[int] = ()) -> str:
        """Launch ``spec``'s server; ``gpu_ids`` (cuda): its GPUs, or one per rank where ranks share GPUs."""
        port = port or free_port(spec.host)
        if spec.device == "cuda" and len(distinct(gpu_ids)) < len(gpu_ids):
            gpu_ids = list(gpu_ids)
            flags = rank_placement(spec, gpu_ids, distinct(gpu_ids))
            spec = replace(spec, extra_args=list(spec.extra_args) + flags)
            gpu_ids = distinct(gpu_ids)
        cmd = build_command(spec, port)
        self.spec = spec
        self.url = f"http://{spec.host}:{port}"
        log.info("starting worker: %s", printable_command(cmd))
        self.proc = self._popen(cmd, spec, gpu_ids, stdin=None)
        return self.url

    def start_standby(self, spec: WorkerSpec, gpu_ids: Sequence[int] = (), gpu_index: Optional[int] = None) -> None:
        """Launch a warm engine that waits for its layout (``activate``); ``spec`` gives kind, device, env, log;
        ``gpu_ids`` are its visible GPUs and ``gpu_index`` the one (among them) it warms up."""
        cmd = standby_command(spec, gpu_index)
        log.info("starting standby worker: %s", printable_command(cmd))
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        try:
            self.proc = self._popen(cmd, spec, gpu_ids, stdin=subprocess.PIPE,
                                    extra_env={STANDBY_READY_FD_ENV: str(write_fd)}, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._ready_fd, self._ready = read_fd, False

    def standby_ready(self) -> bool:
        """True once this standby has warmed up (it said so on its ready pipe) and is still waiting."""
        if not self._ready and self._ready_fd is not None:
            try:
                self._ready = os.read(self._ready_fd, 16).startswith(b"ready")
            except BlockingIOError:
                pass
            except OSError:
                self._close_ready()
        return self._ready and self.returncode() is None and self.url is None

    def was_warm(self) -> bool:
        """Whether this standby ever said it was warm (also after it exited)."""
        self.standby_ready()
        return self._ready

    def _close_ready(self) -> None:
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None

    def activate(self, spec: WorkerSpec, port: Optional[int] = None) -> str:
        """Give this standby ``spec``'s server arguments; it serves them from here on. Raises OSError or
        RuntimeError when the standby cannot take them (it exited, its pipe is closed)."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise RuntimeError("not a standby worker")
        if proc.poll() is not None:
            raise RuntimeError(f"standby pid {proc.pid} exited with status {proc.returncode}")
        port = port or free_port(spec.host)
        argv = build_command(spec, port)[3:]        # drop "python -m <module>"
        log.info("activating standby pid %d: %s", proc.pid, printable_command(argv))
        proc.stdin.write((json.dumps({"argv": argv}) + "\n").encode())
        proc.stdin.close()                           # one message per standby; raises if the pipe is broken
        self.spec = spec
        self.url = f"http://{spec.host}:{port}"
        self._close_ready()
        return self.url

    def _popen(self, cmd: List[str], spec: WorkerSpec, gpu_ids: Sequence[int], stdin,
               extra_env: Optional[Dict[str, str]] = None, pass_fds: Sequence[int] = ()) -> subprocess.Popen:
        env = build_env(spec, gpu_ids)
        env.update(extra_env or {})
        out = None
        if spec.log_path:
            os.makedirs(os.path.dirname(spec.log_path) or ".", exist_ok=True)
            self._log_file = out = open(spec.log_path, "ab")
        return subprocess.Popen(cmd, env=env, stdin=stdin, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True, pass_fds=tuple(pass_fds))

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def returncode(self) -> Optional[int]:
        """None while the server process runs, else its exit status."""
        return self.proc.poll() if self.proc else -1

    def health(self) -> bool:
        return self.returncode() is None and bool(self.url) and http_ok(self.url + "/health")

    def drain(self, timeout: float) -> bool:
        """The router stops sending before this is called and counts in-flight requests itself; here we
        only confirm the server still answers, so a later stop() does not cut a response short."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.returncode() is not None or self.health():
                return True
            time.sleep(0.2)
        return False

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, self.proc
        if proc is not None and proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()   # a standby that never got a layout exits at end of input
            except OSError:
                pass
        if proc is None or proc.poll() is not None:
            self._close_log()
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._close_log()

    def _close_log(self) -> None:
        self._close_ready()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
