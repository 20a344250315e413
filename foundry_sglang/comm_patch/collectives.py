"""SAVE of a virtual rank: every collective of the model becomes a Foundry slot placeholder.

One process captures rank r of an N-rank layout alone, on one GPU, with no communicator. The model's
``Collectives`` calls land here: instead of communicating, each one launches ``foundry_core``'s placeholder
kernel on the current stream and records what it stands for (op, group, dtype, element count, send and receive
addresses inside the arena). LOAD on a real rank captures the real collective in its place
(``foundry_sglang.comm_patch.nccl``). Outside a capture (warm-ups) the placeholder is a no-op, so warm-up
values are not reduced — harmless, since only the captured topology and addresses are kept.
"""
from __future__ import annotations

import torch

from foundry_sglang.engine.parallel import Collectives

__all__ = ["PlaceholderCollectives"]


class PlaceholderCollectives(Collectives):
    """``Collectives`` that record slots in a SAVE ``foundry_core.Session``."""

    def __init__(self, session):
        self.session = session
        self.launched = 0

    def _slot(self, op: str, group: str, send: torch.Tensor, recv: torch.Tensor) -> None:
        if not (send.is_contiguous() and recv.is_contiguous()):
            raise ValueError(f"{op}: collectives need contiguous tensors")
        self.session.slot(op, group=group, dtype=str(send.dtype).removeprefix("torch."), count=send.numel(),
                          send=send.data_ptr(), recv=recv.data_ptr(),
                          send_bytes=send.numel() * send.element_size(),
                          recv_bytes=recv.numel() * recv.element_size())
        self.launched += 1

    def all_reduce(self, x: torch.Tensor, group: str) -> None:
        self._slot("all_reduce", group, x, x)

    def all_gather(self, out: torch.Tensor, x: torch.Tensor, group: str) -> None:
        self._slot("all_gather", group, x, out)
