"""Tensor- and expert-parallel state and layers over torch.distributed.

Layout: world size = max(tp, ep); tp and ep are each 1 or the world size. Attention and dense MLPs are split
over the TP group (all ranks when tp > 1, else none); MoE experts are split over the EP group (all ranks when
ep > 1, else each expert's intermediate dimension is split over the TP group). Every layer loads FULL tensors
through ``weight_loader`` and keeps its shard, so any layout sees the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    tp: int = 1
    ep: int = 1
    control_group: Optional[object] = None   # gloo group for step messages (None when world_size == 1)

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp > 1 else 0

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep > 1 else 0


_STATE = ParallelState()


def get_state() -> ParallelState:
    return _STATE


def set_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _STATE.tp > 1:
        dist.all_reduce(x)
    return x


def all_reduce_world(x: torch.Tensor) -> torch.Tensor:
    if _STATE.world_size > 1:
        dist.all_reduce(x)
    return x


def tp_all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the TP ranks' slices along the last dim."""
    if _STATE.tp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.tp)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by the parallel degree {b}")
    return a // b


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over TP ranks. ``shards`` lists the output sizes of the fused
    pieces (e.g. gate and up) so each piece is split separately."""

    def __init__(self, in_features: int, shards, dtype, device):
        super().__init__()
        st = get_state()
        self.shards = list(shards)
        self.local = [divide(s, st.tp, "output size") for s in self.shards]
        self.weight = nn.Parameter(torch.empty(sum(self.local), in_features, dtype=dtype, device=device),
                                   requires_grad=False)

    def weight_loader(self, full: torch.Tensor, shard: int = 0) -> None:
        r = get_state().tp_rank
        n = self.local[shard]
        off = sum(self.local[:shard])
        self.weight.data[off:off + n].copy_(full[r * n:(r + 1) * n])

    def forward(self, x):
        return F.linear(x, self.weight)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; kv heads are replicated when tp exceeds their count."""

    def __init__(self, hidden, head_dim, n_q, n_kv, dtype, device):
        st = get_state()
        self.head_dim = head_dim
        self.n_q_local = divide(n_q, st.tp, "num_attention_heads")
        if n_kv >= st.tp:
            self.n_kv_local = divide(n_kv, st.tp, "num_key_value_heads")
            self.kv_start = st.tp_rank * self.n_kv_local
        else:
            self.n_kv_local = 1
            self.kv_start = st.tp_rank * n_kv // st.tp
        nn.Module.__init__(self)
        self.local = [self.n_q_local * head_dim, self.n_kv_local * head_dim, self.n_kv_local * head_dim]
        self.weight = nn.Parameter(torch.empty(sum(self.local), hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def weight_loader(self, full: torch.Tensor, shard: int = 0) -> None:
        d = self.head_dim
        if shard == 0:
            start = get_state().tp_rank * self.n_q_local * d
            src, off = full[start:start + self.local[0]], 0
        else:
            src = full[self.kv_start * d:(self.kv_start + self.n_kv_local) * d]
            off = self.local[0] + (shard - 1) * self.local[1]
        self.weight.data[off:off + src.shape[0]].copy_(src)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over TP ranks, then an all-reduce."""

    def __init__(self, in_features: int, out_features: int, dtype, device):
        super().__init__()
        self.in_local = divide(in_features, get_state().tp, "input size")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype, device=device),
                                   requires_grad=False)

    def weight_loader(self, full: torch.Tensor, shard: int = 0) -> None:
        r = get_state().tp_rank
        self.weight.data.copy_(full[:, r * self.in_local:(r + 1) * self.in_local])

    def forward(self, x):
        return tp_all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over TP ranks (padded to a multiple of tp): each rank looks up its
    range, zeroes the rest, and an all-reduce sums. Also the LM head (``logits``) by all-gather."""

    def __init__(self, vocab: int, hidden: int, dtype, device):
        super().__init__()
        st = get_state()
        self.vocab = vocab
        self.vocab_local = -(-vocab // st.tp)
        self.start = st.tp_rank * self.vocab_local
        self.weight = nn.Parameter(torch.zeros(self.vocab_local, hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def weight_loader(self, full: torch.Tensor, shard: int = 0) -> None:
        part = full[self.start:self.start + self.vocab_local]
        self.weight.data[:part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_state().tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.vocab_local)
        out = F.embedding(local.clamp(0, self.vocab_local - 1), self.weight) * inside.unsqueeze(-1)
        return tp_all_reduce(out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return tp_all_gather_last(F.linear(h, self.weight))[..., :self.vocab]
