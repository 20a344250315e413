"""SGLang's scheduler processes from a warm forkserver instead of a fresh ``spawn``.

SGLang starts one scheduler process per rank (and a detokenizer) with ``mp.Process`` after
``_set_envs_and_config`` forced the ``spawn`` start method (``srt/entrypoints/engine.py``, 0.5.17 and 0.5.23):
every one of them starts an interpreter and imports torch, SGLang's scheduler and model runner and all model
files (``srt/models/registry.py`` imports every module of ``srt/models``). A standby SGLang server
(:mod:`.standby`) pays that once, ahead: :func:`start` launches multiprocessing's forkserver with those modules
imported (:func:`wait_warm` waits for it), and :func:`use_forkserver` (an AFTER hook on ``_set_envs_and_config``)
makes SGLang's later ``mp.Process`` calls fork from it. The forkserver must not start CUDA (:func:`_preload`):
the GPU's name and compute capability, which SGLang's modules ask for at import, are answered from NVML where
every GPU of the node is alike (:mod:`.gpu_facts`; a process forked from it checks the answers), and a module
that wants more of CUDA at import is left to the processes themselves.

A forked process would otherwise keep the forkserver's environment, limits and parent; :class:`_InChild` gives
it the launcher's environment as it is at ``start()`` (``FOUNDRY_MODE``, ``CUDA_VISIBLE_DEVICES`` and what SGLang
set) and its open-file and stack limits (SGLang raises them in the launcher, and spawned processes inherit them),
and stops it when the launcher dies (SGLang's own ``PR_SET_PDEATHSIG`` watches the forkserver instead). SGLang's
scheduler and detokenizer report a crash with SIGQUIT to their parent process, which for a forked process is the
forkserver: the forkserver passes it on to the launcher (:func:`_forward_sigquit`).

A start whose exec-time environment (``LD_PRELOAD``, ``LD_LIBRARY_PATH``) or executable differs from the
forkserver's is spawned as before: SGLang swaps the executable for a ``numactl`` wrapper to bind a rank to its
GPU's NUMA node, after checking that the start method is ``spawn``, which is what this context reports. The
forkserver imports with NVML-based CUDA checks and must not initialise CUDA: :func:`start` checks that a forked
process can still use CUDA (:func:`wait_warm`); the standby then keeps ``spawn``.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.context as mp_context
import multiprocessing.forkserver
import os
import resource
import select
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

from foundry_sglang.proc import FORKSERVER_PRELOAD_ENV

from . import gpu_facts

log = logging.getLogger("foundry_sglang.plugin.forkserver")
#: Environment that takes effect only when a program is executed: a fork cannot change it.
EXEC_ONLY_ENV = ("LD_PRELOAD", "LD_LIBRARY_PATH")
#: SGLang's function that forces ``spawn`` before it starts its processes.
SET_ENVS_TARGET = "sglang.srt.entrypoints.engine._set_envs_and_config"

#: In the forkserver (and so in every process forked from it): {"ok": [modules], "failed": {module: reason}}.
PRELOAD_REPORT: Dict[str, Any] = {"ok": [], "failed": {}, "gpu": None}
_server_env: Dict[str, str] = {}   # the forkserver's environment (for EXEC_ONLY_ENV)
_server_executable: list = []      # the executable the forkserver runs (SGLang may swap spawn's for numactl's)


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CudaAtImport(RuntimeError):
    """A module wanted CUDA while the forkserver imported it (some SGLang model files query the GPU at import)."""


def _refuse_cuda(*_: Any, **__: Any) -> None:
    raise CudaAtImport("initialises CUDA at import: left to the processes themselves (a process forked after "
                       "CUDA started could not use it)")


def _answer_gpu_queries(torch: Any, kind: Optional[gpu_facts.GpuKind]) -> Callable[[], None]:
    """Make torch's CUDA initialisation raise :class:`CudaAtImport`, and (where ``kind`` is known: one GPU kind
    on the node) answer ``torch.cuda.get_device_name``/``get_device_capability`` with it, until the returned
    function is called. Answers a module caches (SGLang's ``is_sm90_supported`` and the like) are those every
    process forked from here would compute; :func:`_probe` checks them against the GPU."""
    cuda = torch.cuda
    originals = {"_lazy_init": cuda._lazy_init, "get_device_name": cuda.get_device_name,
                 "get_device_capability": cuda.get_device_capability}
    preloading = True

    def get_device_name(device: Any = None) -> str:
        return kind[0] if preloading else originals["get_device_name"](device)

    def get_device_capability(device: Any = None) -> Any:
        return kind[1] if preloading else originals["get_device_capability"](device)

    cuda._lazy_init = _refuse_cuda
    if kind is not None:
        # a module that bound these names keeps working once the preload is over (they then ask torch)
        cuda.get_device_name, cuda.get_device_capability = get_device_name, get_device_capability

    def restore() -> None:
        nonlocal preloading
        preloading = False
        for name, fn in originals.items():
            setattr(cuda, name, fn)

    return restore


def _preload(names: Sequence[str]) -> None:
    """Import ``names`` (in the forkserver), recording which failed; never raises (the forkserver must live).
    Once torch is imported, torch's CUDA initialisation (``torch.cuda._lazy_init``, which every device query and
    CUDA tensor goes through) raises :class:`CudaAtImport` until the end, and the GPU's name and compute
    capability are answered from NVML where every GPU of the node is alike (:mod:`.gpu_facts`): a module that
    needs more of CUDA at import is not preloaded, and the forkserver stays fit to fork from."""
    restore = None
    try:
        for name in names:
            try:
                importlib.import_module(name)
                PRELOAD_REPORT["ok"].append(name)
            except BaseException as exc:  # noqa: BLE001 - an import may raise anything; report it
                PRELOAD_REPORT["failed"][name] = _one_line(exc)
            torch = sys.modules.get("torch")
            if restore is None and torch is not None and hasattr(torch, "cuda"):
                kind = gpu_facts.node_gpu() if torch.cuda.is_available() else None   # never raises
                PRELOAD_REPORT["gpu"] = None if kind is None else [kind[0], list(kind[1])]
                restore = _answer_gpu_queries(torch, kind)
    finally:
        if restore is not None:
            restore()


def _forward_sigquit() -> None:
    """In the forkserver: pass SIGQUIT (SGLang's crash report from a process forked here) on to the launcher."""
    launcher = os.getppid()

    def forward(*_: Any) -> None:
        try:
            os.kill(launcher, signal.SIGQUIT)
        except OSError:  # the launcher is gone: its children die with it anyway
            pass

    signal.signal(signal.SIGQUIT, forward)


_modules = os.environ.get(FORKSERVER_PRELOAD_ENV, "")
if _modules:  # this is the forkserver
    _forward_sigquit()
    _preload([n for n in _modules.split(",") if n])


@contextlib.contextmanager
def _scoped_env(values: Dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _probe(conn: Any, device: str) -> None:
    """In a process forked from the forkserver: what it preloaded and, on GPU, whether CUDA still works and
    every GPU is what the forkserver answered while it imported (``gpu``)."""
    report = {"ok": list(PRELOAD_REPORT["ok"]), "failed": dict(PRELOAD_REPORT["failed"]),
              "gpu": PRELOAD_REPORT.get("gpu"), "cuda": None}
    if device == "cuda":
        try:
            import torch

            torch.cuda.init()   # raises in a child of a process that had initialised CUDA
            report["cuda"] = "ok"
            answered = report["gpu"]
            for index in range(torch.cuda.device_count() if answered else 0):
                actual = [torch.cuda.get_device_name(index), list(torch.cuda.get_device_capability(index))]
                if actual != answered:
                    report["cuda"] = f"GPU {index} is {actual}, but imports were told {answered}"
                    break
        except Exception as exc:  # reported: the standby then keeps spawn
            report["cuda"] = _one_line(exc)
    conn.send(report)
    conn.close()


def start(modules: Sequence[str]) -> float:
    """Start the forkserver, which imports ``modules`` while the caller goes on; returns the start time for
    :func:`wait_warm`."""
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    # NVML answers torch.cuda.is_available() without initialising CUDA, which a forked process could not undo.
    with _scoped_env({FORKSERVER_PRELOAD_ENV: ",".join(modules), "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}):
        multiprocessing.forkserver.ensure_running()
    _server_env.clear()
    _server_env.update(os.environ)
    _server_executable[:] = [_executable()]
    return t0


def _executable() -> str:
    return os.fsdecode(multiprocessing.spawn.get_executable())


def wait_warm(t0: float, device: str = "cpu", timeout: float = 600.0) -> Dict[str, Any]:
    """Wait until the forkserver has imported everything (a process forked from it answers). Returns its report:
    ``ok``/``failed`` modules, ``cuda`` (on GPU: "ok" or why a forked process cannot use CUDA), ``error`` (the
    forkserver did not answer) and ``seconds`` since :func:`start`."""
    ctx = multiprocessing.get_context("forkserver")
    reader, writer = ctx.Pipe(duplex=False)
    probe = ctx.Process(target=_probe, args=(writer, device), name="forkserver-probe")
    report: Dict[str, Any] = {"ok": [], "failed": {}, "cuda": None}
    try:
        probe.start()     # the forkserver forks only once it has imported everything
        writer.close()
        if reader.poll(timeout):
            report = reader.recv()
        else:
            report["error"] = f"the forkserver did not answer within {timeout:.0f}s"
    except (OSError, EOFError) as exc:
        report["error"] = f"the forkserver failed: {_one_line(exc)}"
    finally:
        reader.close()
        if probe.pid is not None:
            probe.join(30)
    report["seconds"] = round(time.monotonic() - t0, 2)
    return report


def usable(report: Dict[str, Any]) -> Optional[str]:
    """None when processes may fork from the forkserver :func:`start` reported on, else why not (one line)."""
    if report.get("error"):
        return report["error"]
    if report.get("cuda") not in (None, "ok"):
        return f"CUDA does not work in a process forked from it ({report['cuda']})"
    return None


def forkserver_pid() -> Optional[int]:
    return multiprocessing.forkserver._forkserver._forkserver_pid


# -- the processes SGLang starts ---------------------------------------------------------------------
def _die_with(pid: int) -> None:
    """SIGKILL this process when process ``pid`` exits (a pidfd where the kernel has them, else polling)."""
    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGKILL)
            return
        except (AttributeError, OSError):
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os.kill(os.getpid(), signal.SIGKILL)
                except PermissionError:
                    pass
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


#: Limits SGLang sets in its launcher (``set_ulimit``) that a spawned process would inherit.
LIMITS = (resource.RLIMIT_NOFILE, resource.RLIMIT_STACK)


class _InChild:
    """A process target that first takes the launcher's environment and limits and ties its life to the
    launcher."""

    def __init__(self, target: Callable, env: Dict[str, str], launcher: int):
        self.target, self.env, self.launcher = target, env, launcher
        self.limits = {r: resource.getrlimit(r) for r in LIMITS}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        os.environ.clear()
        os.environ.update(self.env)
        for r, limit in self.limits.items():
            try:
                resource.setrlimit(r, limit)
            except (ValueError, OSError) as exc:  # a hard limit the forkserver lowered: keep its own
                log.warning("foundry: limit %s not carried over: %s", r, _one_line(exc))
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)  # the forkserver's forwarder is not this process's
        _die_with(self.launcher)
        return self.target(*args, **kwargs)


class _FromForkserver(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        changed = [k for k in EXEC_ONLY_ENV if os.environ.get(k) != _server_env.get(k)]
        if _server_executable and _executable() != _server_executable[0]:
            changed.append(f"the executable ({_executable()})")
        if changed or process_obj._target is None:
            log.info("foundry: %s spawned (%s changed since the forkserver started)", process_obj.name,
                     ", ".join(changed) or "no target")
            return mp_context.SpawnProcess._Popen(process_obj)
        process_obj._target = _InChild(process_obj._target, dict(os.environ), os.getpid())
        return mp_context.ForkServerProcess._Popen(process_obj)


class _Context(mp_context.ForkServerContext):
    # SGLang asserts get_start_method() == "spawn" before it swaps spawn's executable (NUMA binding); a process
    # started after such a swap is spawned (_FromForkserver), so the check's purpose holds.
    _name = "spawn"
    Process = _FromForkserver


_CONTEXT = _Context()


def use_forkserver(*_: Any, **__: Any) -> None:
    """Make ``mp.Process`` (the default context, which SGLang just set to spawn) start from the forkserver.
    An AFTER hook on :data:`SET_ENVS_TARGET`; also callable directly."""
    multiprocessing.context._default_context._actual_context = _CONTEXT
    log.info("foundry: SGLang's processes start from the warm forkserver (pid %s)", forkserver_pid())


def install_hook() -> None:
    """Register and apply :func:`use_forkserver` on SGLang's ``_set_envs_and_config`` (this process only; its
    module must import)."""
    importlib.import_module(SET_ENVS_TARGET.rsplit(".", 1)[0])
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(SET_ENVS_TARGET, use_forkserver, HookType.AFTER)
    HookRegistry.apply_hooks()

