"""The SGLang plugin's settings and its policy on server flags: which it pins, which it refuses and why.

Settings come from the environment (spawned scheduler processes inherit ``os.environ``): ``FOUNDRY_MODE``,
``FOUNDRY_ARCHIVE`` and ``FOUNDRY_RANKS_SHARE_GPU``, read by :func:`config_from_env` into the one
:class:`~foundry_sglang.graphs.FoundryConfig` (setting only the archive directory enables ``auto``; a mode without a
directory uses :data:`~foundry_sglang.graphs.settings.DEFAULT_ARCHIVE_DIR`). Whether a refused flag is an error or
makes the server run without Foundry is the mode's rule (``FoundryMode.strict``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from foundry_core.errors import FoundryError
from foundry_sglang.graphs.settings import DEFAULT_ARCHIVE_DIR, FoundryConfig, FoundryMode

from .compat import graph_backends
from .parallel import parallel_refusal

__all__ = [
    "PINS", "UnsafeFlag", "check_flags", "config_from_env", "graphs_disabled", "prefill_graphs_disabled", "refusals",
]


class UnsafeFlag(FoundryError):
    """A server flag makes restored graphs unsafe; the message names the flag to change."""


def config_from_env(environ: Optional[Mapping[str, str]] = None) -> FoundryConfig:
    """``FoundryConfig.from_env`` with the plugin's default directory; raises UnsafeFlag (one line) on an unknown
    mode."""
    try:
        return FoundryConfig.from_env(environ, default_archive_dir=DEFAULT_ARCHIVE_DIR)
    except ValueError as err:
        raise UnsafeFlag(str(err)) from None


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
    if graph_backends(args)[0] == "disabled":
        return "the decode CUDA-graph backend is disabled"
    return None


def prefill_graphs_disabled(args: Any) -> bool:
    """Whether the effective prefill backend is 'disabled' (from the flags, or from the ``cuda_graph_config``
    SGLang 0.5.17 resolves every graph flag into, Foundry's own pin included)."""
    return graph_backends(args)[1] == "disabled"


#: Launcher pins: flags added when the user gave none of the listed alternatives.
PINS = (
    # Prefill CUDA graphs ("breakable" by default on CUDA in 0.5.23) are captured live into the same shared
    # pool before the decode graphs; restoring decode graphs next to them is not validated.
    (("--cuda-graph-backend-prefill", "--disable-prefill-cuda-graph", "--disable-cuda-graph", "--cuda-graph-config"),
     ["--cuda-graph-backend-prefill", "disabled"]),
)


def refusals(args: Any) -> list[str]:
    """One line per server flag that makes save/restore unsafe, each naming the flag to change (empty: all fine)."""
    out = []
    if _get(args, "enable_memory_saver"):
        out.append("--enable-memory-saver (torch_memory_saver) moves graph memory behind our arena; remove it")
    decode_backend = graph_backends(args)[0]
    if decode_backend in ("breakable", "tc_piecewise"):
        out.append(f"--cuda-graph-backend-decode {decode_backend} splits graphs at Python breaks; "
                   "use full (the default)")
    if _get(args, "debug_cuda_graph"):
        out.append("--debug-cuda-graph needs the breakable backend; remove it")
    if not prefill_graphs_disabled(args):
        out.append("prefill CUDA graphs (breakable by default) share the graph pool; add "
                   "--cuda-graph-backend-prefill disabled (python -m foundry_sglang.launch adds it for you)")
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
    parallel = parallel_refusal(args)
    if parallel:
        out.append(parallel)
    return out


def check_flags(args: Any, mode: FoundryMode | str) -> Optional[str]:
    """Apply the policy for ``mode``: return None to proceed, a reason to run without Foundry, or raise.

    A strict mode (``FoundryMode.strict``: an explicit ``save``) raises :class:`UnsafeFlag` on the first refusal;
    ``load`` and ``auto`` degrade to plain SGLang with the same message as a warning.
    """
    disabled = graphs_disabled(args)
    if disabled:
        return f"{disabled}; no decode CUDA graphs to save or restore"
    problems = refusals(args)
    if not problems:
        return None
    mode = FoundryMode.parse(mode)
    if mode.strict:
        raise UnsafeFlag(f"--foundry-mode {mode} refused: {problems[0]}")
    return problems[0]
