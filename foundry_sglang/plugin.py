"""The SGLang plugin: entry point, configuration, and which server flags it pins or refuses.

SGLang 0.5.23 calls every entry point of the group ``sglang.srt.plugins`` from ``load_plugins()``
(``srt/plugins/__init__.py``) in the launcher, in each scheduler process, the DP controller and the detokenizer.
Our entry point (``pyproject.toml``: ``foundry = "foundry_sglang.plugin:register"``) does nothing unless Foundry
is enabled through the environment (spawned scheduler processes inherit ``os.environ``):

* ``FOUNDRY_MODE``: ``auto`` (load a compatible archive, else capture and save), ``save``, ``load``, ``off``;
* ``FOUNDRY_ARCHIVE``: archive directory (default ``~/.cache/foundry_sglang``). Setting only this enables ``auto``.

``python -m foundry_sglang.launch`` sets both. When enabled, :func:`register` registers the hooks listed in
:data:`HOOKS` with SGLang's ``HookRegistry`` (``srt/plugins/hook_registry.py``); ``load_plugins()`` applies them.
The hook bodies live in :mod:`foundry_sglang.hooks`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from foundry_core.errors import FoundryError

log = logging.getLogger("foundry_sglang.plugin")

MODES = ("auto", "save", "load", "off")
ENV_MODE = "FOUNDRY_MODE"
ENV_ARCHIVE = "FOUNDRY_ARCHIVE"
DEFAULT_ARCHIVE_DIR = "~/.cache/foundry_sglang"

_MR = "sglang.srt.model_executor.model_runner.ModelRunner"
_FULL = "sglang.srt.model_executor.runner_backend.full_cuda_graph_backend.FullCudaGraphBackend"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"

#: (target, hook type name, hook function name in foundry_sglang.hooks, why). Seams of sglang 0.5.23:
HOOKS = (
    # ModelRunner.__init__ runs init_torch_distributed() (NCCL and custom all-reduce already up: Scheduler
    # called bootstrap.init_parallel_runtime) and then initialize(), whose load_model() allocates the weights.
    (f"{_MR}.initialize", "BEFORE", "before_model_runner_initialize", "arm the arena before weights/KV"),
    # alloc_memory_pool -> KVCacheConfigurator.configure -> _resolve_memory_pool_config profiles free memory;
    # SAVE records its MemoryPoolConfig, LOAD returns the recorded one so the KV pool is allocated identically.
    (f"{_KVC}._resolve_memory_pool_config", "AROUND", "around_resolve_memory_pool_config", "save/force KV pool"),
    # DecodeCudaGraphRunner._capture enters backend.capture_session(stream) around all capture_one calls.
    (f"{_FULL}.capture_session", "AROUND", "around_capture_session", "arena capture phase + graph pool"),
    # capture_one: SAVE captures and records, LOAD fills _graphs/_outputs from the archive; replay() untouched.
    (f"{_FULL}.capture_one", "REPLACE", "replace_capture_one", "capture+record or restore"),
    # init_cuda_graphs ends after the last capture: SAVE writes the archive there.
    (f"{_MR}.init_cuda_graphs", "AFTER", "after_init_cuda_graphs", "write the archive"),
)


class UnsafeFlag(FoundryError):
    """A server flag makes restored graphs unsafe; the message names the flag to change."""


@dataclass(frozen=True)
class FoundryConfig:
    """What the user asked for, read from the environment."""

    mode: str  # one of MODES
    archive_dir: Path

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


def config_from_env(environ: Optional[dict] = None) -> FoundryConfig:
    """Read ``FOUNDRY_MODE``/``FOUNDRY_ARCHIVE``; raises UnsafeFlag (one line) on an unknown mode."""
    env = os.environ if environ is None else environ
    archive = env.get(ENV_ARCHIVE, "")
    mode = env.get(ENV_MODE, "").strip().lower() or ("auto" if archive else "off")
    if mode not in MODES:
        raise UnsafeFlag(f"{ENV_MODE}={mode!r} is not one of {', '.join(MODES)}")
    return FoundryConfig(mode=mode, archive_dir=Path(archive or DEFAULT_ARCHIVE_DIR).expanduser())


# -- flag policy -----------------------------------------------------------------------------------
def _get(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def graphs_disabled(args: Any) -> Optional[str]:
    """Why SGLang will capture no decode graph with these args (then the plugin has nothing to do), or None."""
    if _get(args, "disable_cuda_graph"):
        return "--disable-cuda-graph is set"
    if _get(args, "disable_decode_cuda_graph"):
        return "--disable-decode-cuda-graph is set"
    if _get(args, "cuda_graph_backend_decode") == "disabled":
        return "--cuda-graph-backend-decode disabled is set"
    return None


def prefill_graphs_disabled(args: Any) -> bool:
    return bool(_get(args, "disable_prefill_cuda_graph") or _get(args, "disable_cuda_graph")
                or _get(args, "cuda_graph_backend_prefill") == "disabled")


#: Launcher pins: flags added when the user gave none of the listed alternatives.
PINS = (
    # Prefill CUDA graphs ("breakable" by default on CUDA in 0.5.23) are captured live into the same shared
    # pool before the decode graphs; restoring decode graphs next to them is not validated.
    (("--cuda-graph-backend-prefill", "--disable-prefill-cuda-graph", "--disable-cuda-graph", "--cuda-graph-config"),
     ["--cuda-graph-backend-prefill", "disabled"]),
)


def refusals(args: Any) -> list[str]:
    """One line per server flag that makes save/restore unsafe, each naming the flag to change (empty: all fine)."""
    from foundry_sglang.comm_patch import check_parallel_restore

    out = []
    if _get(args, "enable_memory_saver"):
        out.append("--enable-memory-saver (torch_memory_saver) moves graph memory behind our arena; remove it")
    if _get(args, "cuda_graph_backend_decode") == "breakable":
        out.append("--cuda-graph-backend-decode breakable splits graphs at Python breaks; use full (the default)")
    if _get(args, "debug_cuda_graph"):
        out.append("--debug-cuda-graph needs the breakable backend; remove it")
    if not prefill_graphs_disabled(args):
        out.append("prefill CUDA graphs (breakable by default) share the graph pool; add "
                   "--cuda-graph-backend-prefill disabled (python -m foundry_sglang.launch adds it for you)")
    if _get(args, "cuda_graph_config"):
        out.append("--cuda-graph-config is not interpreted by Foundry; "
                   "use --cuda-graph-bs-decode/--cuda-graph-max-bs-decode")
    if _get(args, "use_ray"):
        out.append("--use-ray: SGLang's SchedulerActor does not call load_plugins(), so Foundry cannot run; remove it")
    if _get(args, "enable_pdmux"):
        out.append("--enable-pdmux captures one graph set per stream group; remove it")
    if _get(args, "speculative_algorithm"):
        out.append("--speculative-algorithm: verify/draft graphs are not supported by Foundry yet; remove it")
    if _get(args, "enable_two_batch_overlap") or _get(args, "enable_single_batch_overlap"):
        out.append("--enable-two-batch-overlap/--enable-single-batch-overlap (multi-stream graphs) are not validated; "
                   "remove it")
    if _get(args, "enable_lora"):
        out.append("--enable-lora: adapter buffers are loaded after the graphs and are not restored; remove it")
    if (_get(args, "cpu_offload_gb") or 0) > 0:
        out.append("--cpu-offload-gb moves weights at run time; set it to 0")
    if _get(args, "enable_eplb") or _get(args, "elastic_ep_backend"):
        out.append("--enable-eplb/--elastic-ep-backend rewrite expert placement baked into graphs; remove them")
    if (_get(args, "pp_size") or 1) > 1 and (_get(args, "tp_size") or 1) == 1:
        pass  # reported by check_parallel_restore below
    parallel = check_parallel_restore(args)
    if parallel:
        out.append(parallel)
    return out


def check_flags(args: Any, mode: str) -> Optional[str]:
    """Apply the policy for ``mode``: return None to proceed, a reason to run without Foundry (auto), or raise.

    Explicit ``save``/``load`` raise :class:`UnsafeFlag` on the first refusal; ``auto`` degrades to plain
    SGLang with the same message as a warning.
    """
    disabled = graphs_disabled(args)
    if disabled:
        return f"{disabled}; no decode CUDA graphs to save or restore"
    problems = refusals(args)
    if not problems:
        return None
    if mode in ("save", "load"):
        raise UnsafeFlag(f"--foundry-mode {mode} refused: {problems[0]}")
    return problems[0]


# -- entry point -----------------------------------------------------------------------------------
_registered = False


def register() -> None:
    """Entry point of ``sglang.srt.plugins``: register Foundry's hooks when FOUNDRY_MODE/FOUNDRY_ARCHIVE enable it."""
    global _registered
    try:
        config = config_from_env()
    except UnsafeFlag as err:
        log.error("foundry: %s; Foundry disabled", err)
        return
    if not config.enabled or _registered:
        log.debug("foundry plugin: mode=%s, registered=%s", config.mode, _registered)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from foundry_sglang import hooks

    for target, hook_type, fn_name, _why in HOOKS:
        HookRegistry.register(target, getattr(hooks, fn_name), HookType[hook_type])
    _registered = True
    log.info("foundry plugin enabled: mode=%s archive=%s pid=%d", config.mode, config.archive_dir, os.getpid())


def unregister() -> None:
    """Undo :func:`register` in this process: restore the original functions and drop our hooks.

    SGLang's HookRegistry has no unregister path (``reset()`` clears every plugin's hooks but leaves patched
    functions in place), so this restores the originals from the ``__wrapped__`` chain its wrappers keep and
    removes only our targets from the registry. Meant for tests and for turning Foundry off in-process.
    """
    global _registered
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry

    from foundry_sglang import hooks

    ours = {getattr(hooks, fn_name) for _t, _h, fn_name, _w in HOOKS}
    for target, _hook_type, _fn, _why in HOOKS:
        owner_path, attr = target.rsplit(".", 1)
        owner = pkgutil.resolve_name(owner_path)
        current = owner.__dict__.get(attr)
        original = current
        while _is_registry_wrapper(original):
            original = original.__wrapped__
        if original is not current:
            setattr(owner, attr, original)
        remaining = [h for h in HookRegistry._hooks.get(target, []) if h[1] not in ours]
        if remaining:  # another plugin's hooks on the same target: re-apply them on the next apply_hooks()
            HookRegistry._hooks[target] = remaining
        else:
            HookRegistry._hooks.pop(target, None)
        HookRegistry._patched.discard(target)
    hooks.reset_state()
    _registered = False


def _is_registry_wrapper(fn: Any) -> bool:
    """True for the wrapper functions HookRegistry builds (their code lives in hook_registry.py)."""
    from sglang.srt.plugins import hook_registry

    code = getattr(fn, "__code__", None)
    return (code is not None and hasattr(fn, "__wrapped__")
            and os.path.samefile(code.co_filename, hook_registry.__file__))
