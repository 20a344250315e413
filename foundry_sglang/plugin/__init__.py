"""The SGLang plugin: entry point and the hooks it registers on SGLang 0.5.23.

SGLang calls every entry point of the group ``sglang.srt.plugins`` from ``load_plugins()``
(``srt/plugins/__init__.py``) in the launcher, in each scheduler process, the DP controller and the detokenizer.
Our entry point (``pyproject.toml``: ``foundry = "foundry_sglang.plugin:register"``) does nothing unless Foundry
is enabled through the environment (``FOUNDRY_MODE`` / ``FOUNDRY_ARCHIVE``, read into one ``FoundryConfig`` by
:func:`.flags.config_from_env`); ``python -m foundry_sglang.launch`` sets both. When enabled, :func:`register`
registers the hooks listed in :data:`HOOKS` with SGLang's ``HookRegistry`` (``srt/plugins/hook_registry.py``);
``load_plugins()`` applies them.

Modules: :mod:`.flags` (settings from the environment, flag pins and refusals), :mod:`.parallel` (which TP/EP
layouts restore), :mod:`.keys` (the archive key material of an SGLang server), :mod:`.hooks` (the hook bodies: a
thin adapter over :class:`foundry_sglang.graphs.router.GraphRouter`), :mod:`.collectives` (SGLang's collectives
as slots, its communicators, ranks sharing one GPU), :mod:`.triton_key` (Triton's per-process cache key, computed
while the model loads) and :mod:`.compat` (what differs between SGLang versions).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from foundry_sglang.graphs.settings import FoundryMode
from foundry_sglang.plugin import collectives, hooks
from foundry_sglang.plugin.flags import UnsafeFlag, check_flags, config_from_env, refusals
from foundry_sglang.proc import disable_nvls

__all__ = ["HOOKS", "UnsafeFlag", "check_flags", "config_from_env", "refusals", "register", "unregister"]

log = logging.getLogger("foundry_sglang.plugin")

_MR = "sglang.srt.model_executor.model_runner.ModelRunner"
_FULL = "sglang.srt.model_executor.runner_backend.full_cuda_graph_backend.FullCudaGraphBackend"
_KVC = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_GC = "sglang.srt.model_executor.runner.base_cuda_graph_runner.freeze_gc"

#: (target, hook type name, hook, why). Seams of sglang 0.5.17 and 0.5.23:
HOOKS = (
    # ModelRunner.__init__ runs init_torch_distributed() (NCCL and custom all-reduce already up: Scheduler
    # called bootstrap.init_parallel_runtime) and then initialize(), whose load_model() allocates the weights.
    (f"{_MR}.initialize", "BEFORE", hooks.before_model_runner_initialize, "arm the arena before weights/KV"),
    # alloc_memory_pool -> KVCacheConfigurator.configure -> _resolve_memory_pool_config profiles free memory;
    # SAVE records its MemoryPoolConfig, LOAD returns the recorded one so the KV pool is allocated identically.
    (f"{_KVC}._resolve_memory_pool_config", "AROUND", hooks.around_resolve_memory_pool_config, "save/force KV pool"),
    # The capture loops run inside freeze_gc (full collections around them); a LOAD skips them. A module
    # function: HookRegistry also rebinds the runner modules' `from ... import freeze_gc`.
    (_GC, "AROUND", hooks.around_freeze_gc, "no GC passes around a LOAD"),
    # DecodeCudaGraphRunner._capture enters backend.capture_session(stream) around all capture_one calls.
    (f"{_FULL}.capture_session", "AROUND", hooks.around_capture_session, "arena capture phase + graph pool"),
    # capture_one: SAVE captures and records, LOAD fills _graphs/_outputs from the archive; replay() untouched.
    (f"{_FULL}.capture_one", "REPLACE", hooks.replace_capture_one, "capture+record or restore"),
    # init_cuda_graphs ends after the last capture: SAVE writes the archive there (and fills TP/EP slots).
    (f"{_MR}.init_cuda_graphs", "AFTER", hooks.after_init_cuda_graphs, "write the archive"),
) + collectives.COLLECTIVE_HOOKS  # TP/EP: GroupCoordinator's collectives become slots while a SAVE captures

# -- entry point -----------------------------------------------------------------------------------
_registered = False


def register() -> None:
    """Entry point of ``sglang.srt.plugins``: register Foundry's hooks when FOUNDRY_MODE/FOUNDRY_ARCHIVE enable it
    (and only the shared-GPU placement when ``FOUNDRY_RANKS_SHARE_GPU=1`` asks for it with Foundry off)."""
    global _registered
    try:
        config = config_from_env()
    except UnsafeFlag as err:
        log.error("foundry: %s; Foundry disabled", err)
        return
    share = config.ranks_share_gpu
    if not (config.enabled or share) or _registered:
        log.debug("foundry plugin: mode=%s, registered=%s", config.mode, _registered)
        return
    disable_nvls()  # SGLang processes load plugins before they create NCCL communicators
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook_type, fn, _why in _active_hooks(config.enabled, share):
        HookRegistry.register(target, fn, HookType[hook_type])
    _registered = True
    log.info("foundry plugin enabled: mode=%s archive=%s ranks share a GPU: %s pid=%d", config.mode,
             config.archive_dir, share, os.getpid())
    if config.mode in (FoundryMode.AUTO, FoundryMode.SAVE):
        start_image_recorder_early()


def _active_hooks(enabled: bool, share: bool) -> tuple:
    """HOOKS when Foundry is enabled, plus the shared-GPU hook when the ranks share a GPU
    (``FoundryConfig.ranks_share_gpu``)."""
    active = HOOKS if enabled else ()
    if share:
        active += (collectives.shared_gpu_hook(),)
    return active


def start_image_recorder_early() -> None:
    """Start recording kernel module images now, in a spawned SGLang process before it runs any kernel.

    ``load_plugins()`` is the first statement of SGLang's scheduler process; the Session opens only in
    ``ModelRunner.initialize``, after NCCL and the first CUDA work, whose lazily loaded modules (torch's
    elementwise kernels, ...) the decode graphs use too, so a SAVE would lack their images. The recorder is
    process-wide: the Session's own ``start()`` later finds it running and keeps what it saw; a process that does
    not SAVE stops it (``hooks._stop_early_recorder``). Not in the launcher's own process, which has no parent.

    CUDA may already be initialised here (SGLang's modules query the device capability at import), but no kernel
    has run: CUDA loads a module at its first launch (``CUDA_MODULE_LOADING=LAZY``, torch's default), so starting
    now still sees every module the graphs can use. Measured on the H200 with SGLang 0.5.17: skipping the start
    in that case made a Qwen3-MoE SAVE miss torch's fill kernel module.
    """
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return
    try:
        from foundry_core.recorder import ImageRecorder

        ImageRecorder().start(warn_if_late=False)
    except Exception as err:  # no CUPTI here: a SAVE says so when the Session starts its recorder
        log.warning("foundry: cannot record kernel images early: %s", err)


def unregister() -> None:
    """Undo :func:`register` in this process: restore the original functions and drop our hooks.

    SGLang's HookRegistry has no unregister path (``reset()`` clears every plugin's hooks but leaves patched
    functions in place), so this restores the originals from the ``__wrapped__`` chain its wrappers keep and
    removes only our targets from the registry. Meant for tests and for turning Foundry off in-process.
    """
    global _registered
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry, _propagate_patch

    active = _active_hooks(True, _ranks_share_gpu())
    ours = {fn for _t, _h, fn, _w in active}
    for target, _hook_type, _fn, _why in active:
        owner_path, attr = target.rsplit(".", 1)
        owner = pkgutil.resolve_name(owner_path)
        current = owner.__dict__.get(attr)
        original = current
        while _is_registry_wrapper(original):
            original = original.__wrapped__
        if original is not current:
            setattr(owner, attr, original)
            _propagate_patch(current, original, owner)  # SGLang's own walk, backwards: importers get the original
        remaining = [h for h in HookRegistry._hooks.get(target, []) if h[1] not in ours]
        if remaining:  # another plugin's hooks on the same target: re-apply them on the next apply_hooks()
            HookRegistry._hooks[target] = remaining
        else:
            HookRegistry._hooks.pop(target, None)
        HookRegistry._patched.discard(target)
    hooks.reset_state()
    _registered = False


def _ranks_share_gpu() -> bool:
    try:
        return config_from_env().ranks_share_gpu
    except UnsafeFlag:
        return False


def _is_registry_wrapper(fn: Any) -> bool:
    """True for the wrapper functions HookRegistry builds (their code lives in hook_registry.py)."""
    from sglang.srt.plugins import hook_registry

    code = getattr(fn, "__code__", None)
    return (code is not None and hasattr(fn, "__wrapped__")
            and os.path.samefile(code.co_filename, hook_registry.__file__))
