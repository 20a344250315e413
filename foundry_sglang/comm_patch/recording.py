"""SAVE: a collective becomes a Foundry slot instead of communicating.

An engine adapter intercepts its engine's collectives while a SAVE captures and calls :func:`record_collective`
for each one: it launches ``foundry_core``'s placeholder kernel on the current stream (through
``Session.slot``) and records what the slot stands for — op, group name, dtype, element count, send and receive
addresses (inside the arena) and the reduction. Outside a capture (warm-ups) the placeholder is a no-op, so
warm-up values are not reduced: harmless, since only the captured topology and addresses are kept.

Supported: all-reduce (in place or not), all-gather and reduce-scatter of contiguous tensors, any group whose
name the LOAD side can map to a communicator (``nccl.SlotFiller``). Anything else is refused with
:class:`UnsupportedCollective`, which names the operation, so a graph that would deadlock at LOAD is never saved.
"""
from __future__ import annotations

from typing import Any

from foundry_core.errors import FoundryError

__all__ = ["OPS", "REDUCTIONS", "UnsupportedCollective", "record_collective"]

#: What a slot can stand for, and the reductions an all-reduce / reduce-scatter may use.
OPS = ("all_reduce", "all_gather", "reduce_scatter")
REDUCTIONS = ("sum", "prod", "max", "min", "avg")


class UnsupportedCollective(FoundryError):
    """A collective inside a SAVE capture that no slot can stand for."""


def record_collective(session: Any, op: str, group: str, send, recv, reduce: str = "sum") -> int:
    """Record ``op`` on ``group`` from tensor ``send`` into tensor ``recv`` as a slot of ``session`` (a SAVE
    ``foundry_core.Session``, or anything with its ``slot()``); returns the slot id.

    ``send``/``recv`` follow NCCL's conventions: all-reduce has equal sizes (the same tensor when in place),
    all-gather receives ``world * send.numel()`` elements, reduce-scatter sends ``world * recv.numel()``."""
    if op not in OPS:
        raise UnsupportedCollective(f"collective {op} on group {group!r} cannot be saved (supported: "
                                    f"{', '.join(OPS)})")
    if op != "all_gather" and reduce not in REDUCTIONS:
        raise UnsupportedCollective(f"{op} on group {group!r}: reduction {reduce!r} cannot be saved")
    if not (send.is_contiguous() and recv.is_contiguous()):
        raise UnsupportedCollective(f"{op} on group {group!r}: the tensors must be contiguous")
    if send.dtype != recv.dtype:
        raise UnsupportedCollective(f"{op} on group {group!r}: send is {send.dtype}, receive is {recv.dtype}")
    sizes_ok = {
        "all_reduce": send.numel() == recv.numel(),
        "all_gather": send.numel() > 0 and recv.numel() % send.numel() == 0,
        "reduce_scatter": recv.numel() > 0 and send.numel() % recv.numel() == 0,
    }[op]
    if not sizes_ok:
        raise UnsupportedCollective(f"{op} on group {group!r}: {send.numel()} elements sent, {recv.numel()} received")
    count = recv.numel() if op == "reduce_scatter" else send.numel()
    return session.slot(op, group=group, dtype=str(send.dtype).removeprefix("torch."), count=count,
                        send=send.data_ptr(), recv=recv.data_ptr(),
                        send_bytes=send.numel() * send.element_size(), recv_bytes=recv.numel() * recv.element_size(),
                        extra={} if op == "all_gather" or reduce == "sum" else {"reduce": reduce})
