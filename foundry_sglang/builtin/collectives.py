"""The built-in engine's collectives as Foundry slots: placeholders at SAVE, the live communicator at LOAD.

SAVE of a virtual rank (:mod:`.template`): one process captures rank r of an N-rank layout alone, on one GPU, with
no communicator; the model's ``Collectives`` calls land in :class:`PlaceholderCollectives`, which records each as a
slot (``foundry_sglang.comm_patch.record_collective``). LOAD on a real rank: :func:`slot_filler` fills the slots
of the groups the engine uses ("tp" and "world" both span every rank) on the NCCL communicator torch.distributed
created for the default group.
"""
from __future__ import annotations

import torch

from foundry_core.errors import FoundryError
from foundry_sglang.comm_patch import SlotFiller, TorchCommunicator, process_group_communicator, record_collective
from foundry_sglang.engine.parallel import Collectives
from foundry_sglang.graphs.settings import ENV_SLOT_FILLER, slot_filler_choice

__all__ = ["GROUPS", "PlaceholderCollectives", "slot_filler"]

#: The engine's communication groups (engine.parallel): both span every rank of its layouts.
GROUPS = ("tp", "world")


class PlaceholderCollectives(Collectives):
    """``Collectives`` that record slots in a SAVE ``foundry_core.Session`` instead of communicating."""

    def __init__(self, session):
        self.session = session
        self.launched = 0

    def all_reduce(self, x: torch.Tensor, group: str) -> None:
        record_collective(self.session, "all_reduce", group, x, x)
        self.launched += 1

    def all_gather(self, out: torch.Tensor, x: torch.Tensor, group: str) -> None:
        record_collective(self.session, "all_gather", group, x, out)
        self.launched += 1


def slot_filler(device: int) -> SlotFiller:
    """LOAD: the filler for this rank: direct NCCL calls on torch's communicator when torch exposes it, else
    torch.distributed under the capture. ``FOUNDRY_SLOT_FILLER=torch|nccl`` forces one
    (:func:`~foundry_sglang.graphs.settings.slot_filler_choice`)."""
    choice = slot_filler_choice()
    comm = process_group_communicator() if choice in ("auto", "nccl") else None
    if comm is None and choice == "nccl":
        raise FoundryError(f"{ENV_SLOT_FILLER}=nccl but torch does not expose the NCCL communicator")
    comm = comm or TorchCommunicator(None, device)
    return SlotFiller({group: comm for group in GROUPS})
