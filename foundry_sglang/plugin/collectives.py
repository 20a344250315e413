"""SGLang's collectives as Foundry slots, SGLang's communicators for filling them, and ranks sharing one GPU.

**SAVE** (:func:`recording`): while the plugin captures a decode graph of a TP/EP server (warm-ups and capture),
``GroupCoordinator.all_reduce``, ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` record a slot each
(``foundry_sglang.comm_patch.record_collective``, group = the coordinator's ``unique_name``, e.g. ``tp:0``)
instead of communicating. These are the calls every SGLang layer goes through (``tensor_model_parallel_*``,
``moe_*_all_reduce``, the logits all-gather), whichever backend (pynccl, torch NCCL, custom all-reduce) SGLang
would pick. Every other device collective of ``GroupCoordinator`` raises ``UnsupportedCollective`` naming itself
while recording, so a graph that would deadlock at LOAD is never saved. Outside :func:`recording` the hooks call
SGLang's own methods unchanged.

**LOAD** (:func:`communicators`): each group's slots are filled on the group's pynccl communicator, through the
NCCL library pynccl loaded (``comm_patch.NcclCommunicator``); the SAVE process fills its own graphs the same way.

**Ranks sharing one GPU** (``FOUNDRY_RANKS_SHARE_GPU=1``, ``--foundry-ranks-share-gpu`` of the launcher): every
scheduler process uses ``--base-gpu-id`` (SGLang asserts ``--gpu-id-step`` >= 1) and gets its own
``NCCL_HOSTID`` (NCCL otherwise refuses two ranks on one GPU; it then uses its socket transport over loopback).
One GPU then saves the template of any layout that fits in its memory.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable, Iterator, Optional

from foundry_sglang.comm_patch import NcclCommunicator, UnsupportedCollective, record_collective

from . import compat

__all__ = ["COLLECTIVE_HOOKS", "agreement", "communicators", "recording", "shared_gpu_hook"]

log = logging.getLogger("foundry_sglang.plugin.collectives")

_GC = "sglang.srt.distributed.parallel_state.GroupCoordinator"

_session: Any = None  # the SAVE session recording slots right now (None: collectives run as SGLang's)


@contextlib.contextmanager
def recording(session: Any) -> Iterator[None]:
    """While inside, SGLang's collectives become slots of ``session`` (a SAVE ``foundry_core.Session``)."""
    global _session
    _session = session
    try:
        yield
    finally:
        _session = None


def _recording_for(group: Any) -> Any:
    """The session to record into for a collective on ``group`` (None: run SGLang's own)."""
    return _session if _session is not None and getattr(group, "world_size", 1) > 1 else None


def around_all_reduce(original: Callable, group: Any, input_: Any, *args, **kwargs):
    session = _recording_for(group)
    if session is None:
        return original(group, input_, *args, **kwargs)
    record_collective(session, "all_reduce", group.unique_name, input_, input_)
    return input_  # SGLang's in-place all-reduce returns its input


def _slot_into(op: str) -> Callable:
    """The hook of a collective that writes ``output`` from ``input_`` (all-gather, reduce-scatter)."""
    def around(original: Callable, group: Any, output: Any, input_: Any, *args, **kwargs):
        session = _recording_for(group)
        if session is None:
            return original(group, output, input_, *args, **kwargs)
        record_collective(session, op, group.unique_name, input_, output)
        return None

    around.__name__ = around.__qualname__ = f"around_{op}"
    return around


around_all_gather_into_tensor = _slot_into("all_gather")
around_reduce_scatter_tensor = _slot_into("reduce_scatter")


def around_all_gather(original: Callable, group: Any, input_: Any, dim: int = -1, output_tensor_list=None):
    """The list form calls torch.distributed directly: refused while recording. The tensor form ends in
    ``all_gather_into_tensor``, which records."""
    if output_tensor_list is not None and _recording_for(group) is not None:
        raise UnsupportedCollective(f"GroupCoordinator.all_gather into a tensor list on group {group.unique_name!r} "
                                    "cannot be saved as a Foundry slot")
    return original(group, input_, dim, output_tensor_list)


def around_fused_allreduce_rmsnorm(original: Callable, group: Any, *args, **kwargs):
    """While recording, the fused variant declines (returns None, as it does without custom all-reduce) so the
    model takes its plain all-reduce, which records."""
    if _recording_for(group) is not None:
        return None
    return original(group, *args, **kwargs)


def _refusing(method: str) -> Callable:
    def around(original: Callable, group: Any, *args, **kwargs):
        if _recording_for(group) is not None:
            raise UnsupportedCollective(f"GroupCoordinator.{method} on group {group.unique_name!r} inside a decode "
                                        "graph cannot be saved as a Foundry slot")
        return original(group, *args, **kwargs)

    around.__name__ = around.__qualname__ = f"around_{method}"
    return around


_REFUSED = ("all_to_all_single", "reduce_scatter", "reduce_scatterv", "all_gatherv", "broadcast", "gather", "send",
            "recv")

#: (target, hook type, hook, why): registered with the plugin's other hooks (``foundry_sglang.plugin.HOOKS``).
COLLECTIVE_HOOKS = (
    (f"{_GC}.all_reduce", "AROUND", around_all_reduce, "all-reduce -> slot while a SAVE captures"),
    (f"{_GC}.all_gather_into_tensor", "AROUND", around_all_gather_into_tensor, "all-gather -> slot"),
    (f"{_GC}.reduce_scatter_tensor", "AROUND", around_reduce_scatter_tensor, "reduce-scatter -> slot"),
    (f"{_GC}.all_gather", "AROUND", around_all_gather, "refuse the tensor-list form"),
    (f"{_GC}.fused_allreduce_rmsnorm", "AROUND", around_fused_allreduce_rmsnorm, "take the plain all-reduce"),
) + tuple((f"{_GC}.{m}", "AROUND", _refusing(m), "refused inside a SAVE capture") for m in _REFUSED)


# -- LOAD ------------------------------------------------------------------------------------------------------
def communicators() -> dict[str, NcclCommunicator]:
    """Every live multi-rank ``GroupCoordinator`` of this process with a pynccl communicator, by ``unique_name``."""
    from sglang.srt.distributed import parallel_state

    out: dict[str, NcclCommunicator] = {}
    for name, ref in list(parallel_state._groups.items()):
        group = ref()
        pynccl = getattr(group, "pynccl_comm", None) if group is not None else None
        if pynccl is None or getattr(group, "world_size", 1) <= 1:
            continue
        comm = getattr(pynccl.comm, "value", pynccl.comm)
        out[name] = NcclCommunicator(pynccl.nccl.lib, int(comm))
    return out


def agreement() -> Optional[Callable[[bool], bool]]:
    """``agree(ok)``: True only if every rank of this server says ok (MIN over SGLang's world CPU group); None for a
    single-rank server."""
    import torch
    import torch.distributed as dist

    world = compat.world_group()
    if world.world_size <= 1:
        return None

    def agree(ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=world.cpu_group)
        return bool(flag.item())

    return agree


def world_rank() -> int:
    """This process's rank in SGLang's world group."""
    return int(compat.world_group().rank_in_group)


def barrier() -> None:
    """A barrier over SGLang's world CPU group."""
    import torch.distributed as dist

    world = compat.world_group()
    if world.world_size > 1:
        dist.barrier(group=world.cpu_group)


# -- ranks sharing one GPU -------------------------------------------------------------------------------------
def share_gpu(rank: int) -> None:
    """Make this scheduler process one of several NCCL ranks on one GPU: its own NCCL host id, loopback sockets,
    and SGLang's TP memory-balance check as a warning (the ranks' processes see each other's memory)."""
    os.environ["NCCL_HOSTID"] = f"foundry-rank{rank}"
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] = "false"


@functools.lru_cache(maxsize=None)
def shared_gpu_hook() -> tuple[str, str, Callable, str]:
    """The hook that puts every rank of this server on ``--base-gpu-id`` (see the module docstring); one object
    per process, so that unregistering finds it."""
    return compat.shared_gpu_hook(share_gpu)
