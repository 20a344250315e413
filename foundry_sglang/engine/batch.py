"""One forward step's inputs as plain integers, and their wire format between ranks.

Rank 0 builds a ``StepBatch`` from the scheduled sequences; with several ranks it is packed into one int64
tensor and broadcast over the gloo control group so every rank runs the same forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.distributed as dist

EXIT, PREFILL, DECODE = 0, 1, 2


@dataclass
class StepBatch:
    kind: int
    input_ids: List[int] = field(default_factory=list)
    positions: List[int] = field(default_factory=list)
    slot_mapping: List[int] = field(default_factory=list)
    cu_seqlens: List[int] = field(default_factory=list)          # prefill: packed sequence boundaries
    seq_lens: List[int] = field(default_factory=list)            # decode: KV length incl. the new token
    block_tables: List[List[int]] = field(default_factory=list)  # decode: pages per sequence (ragged)
    eager: int = 0                                                # decode: 1 = skip the CUDA graphs

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens) if self.kind == DECODE else max(0, len(self.cu_seqlens) - 1)

    def pack(self) -> torch.Tensor:
        width = max((len(b) for b in self.block_tables), default=0)
        n = len(self.input_ids)
        flat: List[int] = [self.kind, n, len(self.cu_seqlens), len(self.seq_lens), width, self.eager]
        flat += self.input_ids + self.positions + self.slot_mapping + self.cu_seqlens + self.seq_lens
        for row in self.block_tables:
            flat += row + [0] * (width - len(row))
        return torch.tensor(flat, dtype=torch.int64)

    @classmethod
    def unpack(cls, t: torch.Tensor) -> "StepBatch":
        v = t.tolist()
        kind, n, ncu, nsl, width, eager = v[:6]
        p = 6

        def take(k: int) -> list:
            nonlocal p
            p += k
            return v[p - k:p]

        ids, pos, slots, cu, sl = take(n), take(n), take(n), take(ncu), take(nsl)
        bts = [v[p + i * width:p + (i + 1) * width] for i in range(nsl)]
        return cls(kind, ids, pos, slots, cu, sl, bts, eager)


def broadcast_batch(batch: StepBatch, group) -> None:
    """Rank 0: send a step to the other ranks."""
    payload = batch.pack()
    dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), src=0, group=group)
    dist.broadcast(payload, src=0, group=group)


def receive_batch(group) -> StepBatch:
    """Ranks > 0: wait for the next step."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    payload = torch.empty(int(size.item()), dtype=torch.int64)
    dist.broadcast(payload, src=0, group=group)
    return StepBatch.unpack(payload)
