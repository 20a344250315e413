"""The one place that knows how the SGLang versions the plugin supports differ.

SGLang 0.5.17 pins torch 2.11 and 0.5.23 torch 2.14; the plugin supports both. What moved between them and
matters to Foundry:

* **CUDA-graph settings.** 0.5.17's ``prepare_server_args`` folds every graph flag (``--cuda-graph-backend-*``,
  ``--disable-*-cuda-graph``, ``--cuda-graph-max-bs-decode``/``--cuda-graph-bs-decode``) into one resolved
  ``server_args.cuda_graph_config`` (a ``CudaGraphConfig`` of two ``PhaseConfig``), so that field is set on every
  server, the flags Foundry pins included. 0.5.23 leaves it ``None`` and keeps the per-phase flags.
  :func:`graph_backends` reads the effective (decode, prefill) backends from either form, or from a user's raw
  ``--cuda-graph-config`` JSON before SGLang resolved it.
* **FullCudaGraphBackend.** 0.5.23's has a graph-pool precarver (``_precarve.measure()`` around warm-ups,
  ``_precarve.mint()`` in the capture) and graph-pool borrowing; 0.5.17's has neither. :func:`precarve_measure`
  and :func:`precarve_mint` are no-ops there.
* **KV pool configuration.** Both resolve a ``MemoryPoolConfig`` in ``KVCacheConfigurator.
  _resolve_memory_pool_config(pre_model_load_memory)``, but the dataclass gained fields in 0.5.23
  (``unified_memory_pool_bytes``, ``unified_total_bytes``). :func:`memory_pool_config` rebuilds one from a saved
  dict keeping the fields this version has and refusing to drop a field that was set.
* **Parallel state.** ``runtime_context.get_parallel()`` raises ``ValueError`` (0.5.23) or ``AssertionError``
  (0.5.17, from ``get_tp_group``) before SGLang published it; :func:`parallel_value` treats both as "unknown".
* **A scheduler process's GPU.** 0.5.17 passes ``gpu_id`` to ``Scheduler.__init__``; 0.5.23 publishes it in the
  runtime context (``publish(..., ranks=SpawnRanks(world_rank, dp_rank, gpu_id))``). :func:`shared_gpu_hook`
  rewrites it where each version takes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
from typing import Any, Callable, Optional

FULL, BREAKABLE, TC_PIECEWISE, DISABLED = "full", "breakable", "tc_piecewise", "disabled"


def _get(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def _phase_value(config: Any, phase: str, key: str) -> Any:
    """``config[phase][key]`` of a CudaGraphConfig object, a dict or a JSON string (None if absent)."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            return None
    section = config.get(phase) if isinstance(config, dict) else getattr(config, phase, None)
    if section is None:
        return None
    value = section.get(key) if isinstance(section, dict) else getattr(section, key, None)
    return getattr(value, "value", value)  # enum members -> their string


def graph_backends(args: Any) -> tuple[Optional[str], Optional[str]]:
    """Effective (decode, prefill) CUDA-graph backends of server args of either version; None = SGLang's default.

    Precedence is SGLang's own: the ``cuda_graph_config`` JSON/object wins over the per-phase flags, which win over
    ``--disable-*-cuda-graph``, which win over ``--disable-cuda-graph``.
    """
    backends = []
    config = _get(args, "cuda_graph_config")
    for phase in ("decode", "prefill"):
        backend = _phase_value(config, phase, "backend") if config else None
        if backend is None:
            backend = _get(args, f"cuda_graph_backend_{phase}")
        if backend is None and (_get(args, f"disable_{phase}_cuda_graph") or _get(args, "disable_cuda_graph")):
            backend = DISABLED
        backends.append(backend)
    return backends[0], backends[1]


def decode_batch_settings(args: Any) -> tuple[Optional[int], Optional[list]]:
    """(max_bs, bs list) for decode graphs from the resolved config or the flags (None where SGLang decides)."""
    config = _get(args, "cuda_graph_config")
    max_bs = _phase_value(config, "decode", "max_bs") if config else None
    bs = _phase_value(config, "decode", "bs") if config else None
    return (max_bs if max_bs is not None else _get(args, "cuda_graph_max_bs_decode"),
            bs if bs is not None else _get(args, "cuda_graph_bs_decode"))


# -- FullCudaGraphBackend ----------------------------------------------------------------------------------------
def precarve_measure(backend: Any):
    """``backend._precarve.measure()`` (0.5.23: sizes the graph pool from the warm-ups), else a no-op context."""
    precarve = getattr(backend, "_precarve", None)
    return precarve.measure() if precarve is not None else contextlib.nullcontext()


def precarve_mint(backend: Any) -> None:
    """``backend._precarve.mint()`` inside the capture (0.5.23); nothing on 0.5.17."""
    precarve = getattr(backend, "_precarve", None)
    if precarve is not None:
        precarve.mint()


# -- KV pool -----------------------------------------------------------------------------------------------------
class IncompatiblePoolConfig(ValueError):
    """A saved MemoryPoolConfig set a field this SGLang version does not have."""


def memory_pool_config(cls: type, saved: dict) -> Any:
    """Rebuild ``cls`` (SGLang's MemoryPoolConfig) from a dict saved by either version.

    Fields this version lacks are dropped only when they hold their default (None or 0): a set field (e.g. a
    unified-memory pool size saved by 0.5.23) means the pool would be laid out differently, so it is refused.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    lost = sorted(k for k, v in saved.items() if k not in known and v not in (None, 0))
    if lost:
        raise IncompatiblePoolConfig(f"saved KV pool config sets {', '.join(lost)}, unknown to this SGLang")
    return cls(**{k: v for k, v in saved.items() if k in known})


# -- parallel state ----------------------------------------------------------------------------------------------
def parallel_value(parallel: Any, name: str) -> Optional[int]:
    """``getattr(parallel, name)`` as an int, or None when absent or not published yet (either version's error)."""
    if parallel is None:
        return None
    try:
        value = getattr(parallel, name, None)
    except (ValueError, RuntimeError, AssertionError):
        return None
    return value if isinstance(value, int) else None


def world_group() -> Any:
    """SGLang's world ``GroupCoordinator`` (0.5.23 reads it from the published runtime context and deprecates
    ``get_world_group``, which is all 0.5.17 has and what serves before a context is published)."""
    import warnings

    from sglang.srt.distributed import parallel_state

    try:
        from sglang.srt.runtime_context import get_parallel

        return get_parallel().world_group
    except (ImportError, ValueError, AssertionError, AttributeError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return parallel_state.get_world_group()


# -- ranks sharing one GPU ---------------------------------------------------------------------------------------
def shared_gpu_hook(share: Callable[[int], None]) -> tuple[str, str, Callable, str]:
    """(target, hook type, hook, why): a BEFORE hook that runs ``share(rank)`` in each scheduler process and gives
    that process ``server_args.base_gpu_id`` as its GPU, where this SGLang version takes the GPU."""
    publish = importlib.import_module("sglang.srt.runtime_context").publish
    if "ranks" not in inspect.signature(publish).parameters:  # 0.5.17: Scheduler.__init__ takes the GPU
        def before_scheduler(self, server_args, port_args, gpu_id, tp_rank, *args, **kwargs):
            pp_rank = args[1] if len(args) > 1 else kwargs.get("pp_rank", 0)
            share(pp_rank * server_args.tp_size + tp_rank)
            return (self, server_args, port_args, server_args.base_gpu_id, tp_rank, *args), kwargs

        return ("sglang.srt.managers.scheduler.Scheduler.__init__", "BEFORE", before_scheduler,
                "every rank on --base-gpu-id")

    def before_publish(server_args, *args, **kwargs):  # 0.5.23
        ranks = kwargs.get("ranks")
        if ranks is not None and ranks.gpu_id is not None:
            share(ranks.world_rank)
            kwargs["ranks"] = type(ranks)(world_rank=ranks.world_rank, dp_rank=ranks.dp_rank,
                                          gpu_id=server_args.base_gpu_id)
        return (server_args, *args), kwargs

    return "sglang.srt.runtime_context.publish", "BEFORE", before_publish, "every rank on --base-gpu-id"
