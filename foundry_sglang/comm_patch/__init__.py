"""Rank patching, for every engine: collectives become slots at SAVE, live collectives fill them at LOAD.

A decode graph of one rank of a tensor/expert-parallel layout holds collectives welded to a live NCCL
communicator. comm_patch keeps them out of the archive and puts them back in the new process:

1. **SAVE** (:mod:`.recording`): the engine adapter intercepts its engine's collectives while a SAVE captures and
   records each as a ``foundry_core`` slot (a no-op placeholder kernel plus a ``SlotSpec``: op, group, dtype,
   count, send/receive addresses in the arena, reduction).
2. **One archive for every rank** (``foundry_core.ranks``): rank 0's graphs are stored once with a small
   per-rank byte delta (the rank template); a rank with other kernel code is stored whole inside it (a variant).
3. **LOAD** (:mod:`.nccl`): the real communicators are up; each slot is filled by capturing the real collective
   into the restored graph, in slot order on every rank, on the communicator of its group. The SAVE process
   itself serves its graphs filled the same way (``foundry_core.Session.fill_captured``).

comm_patch knows no engine: each adapter supplies where its collectives are (the built-in engine's
``foundry_sglang.builtin.collectives``, SGLang's ``foundry_sglang.plugin.collectives``) and the communicators of
its groups.
"""
from foundry_sglang.comm_patch.nccl import (
    Communicator,
    NcclCommunicator,
    SlotFiller,
    TorchCommunicator,
    process_group_communicator,
    torch_nccl_library,
)
from foundry_sglang.comm_patch.recording import OPS, REDUCTIONS, UnsupportedCollective, record_collective

__all__ = ["OPS", "REDUCTIONS", "Communicator", "NcclCommunicator", "SlotFiller", "TorchCommunicator",
           "UnsupportedCollective", "process_group_communicator", "record_collective", "torch_nccl_library"]
