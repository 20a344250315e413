"""Tensor- and expert-parallel state and layers over torch.distributed.

Layout: world size = max(tp, ep); tp and ep are each 1 or the world size. Attention and dense MLPs are split
over the TP group (all ranks when tp > 1, else none); MoE experts are split over the EP group (all ranks when
ep > 1, else each expert's intermediate dimension is split over the TP group). Every layer loads FULL tensors
through ``weight_loader`` and keeps its shard, so any layout sees the same weights.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class ParallelState:
    """This process's place in the layout. ``collectives`` performs every cross-rank operation of the model:
    ``TorchCollectives`` (torch.distributed) normally; ``foundry_sglang.comm_patch`` swaps in placeholders when
    one process captures a *virtual* rank of a layout on one GPU (``virtual=True``: no process group exists)."""

    rank: int = 0
    world_size: int = 1
    tp: int = 1
    ep: int = 1
    control_group: Optional[object] = None   # gloo group for step messages (None when world_size == 1)
    virtual: bool = False
    collectives: Optional["Collectives"] = None

    @property
    def tp_rank(self) -> int:
        return self.rank if self.tp > 1 else 0

    @property
    def ep_rank(self) -> int:
        return self.rank if self.ep > 1 else 0


class Collectives:
    """The model's cross-rank operations, in place on contiguous tensors. The groups are "tp" and "world"
    (the layouts here make both span every rank)."""

    def all_reduce(self, x: torch.Tensor, group: str) -> None:
        dist.all_reduce(x)

    def all_gather(self, out: torch.Tensor, x: torch.Tensor, group: str) -> None:
        """``out`` [world * x.shape[0], *x.shape[1:]] receives every rank's ``x``, rank by rank."""
        with warnings.catch_warnings():  # newer torch renames it all_gather_single; 2.11 has only this name
            warnings.simplefilter("ignore", FutureWarning)
            dist.all_gather_into_tensor(out, x)


_STATE = ParallelState()
_TORCH = Collectives()


def get_state() -> ParallelState:
    return _STATE


def set_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def _collectives() -> Collectives:
    return _STATE.collectives or _TORCH


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _STATE.tp > 1:
        _collectives().all_reduce(x, "tp")
    return x


def all_reduce_world(x: torch.Tensor) -> torch.Tensor:
    if _STATE.world_size > 1:
        _collectives().all_reduce(x, "world")
    return x


def tp_all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the TP ranks' slices along the last dim."""
    if _STATE.tp == 1:
        return x
    x = x.contiguous()
    out = torch.empty((_STATE.tp * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _collectives().all_gather(out, x, "tp")
    return out.view(_STATE.tp, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], _STATE.tp * x.shape[-1])


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
        # The rank's vocabulary window as device data, not a kernel argument: graphs stay rank-independent.
        self.register_buffer("window_start", torch.full((1,), self.start, dtype=torch.int64, device=device),
                             persistent=False)

    def weight_loader(self, full: torch.Tensor, shard: int = 0) -> None:
        part = full[self.start:self.start + self.vocab_local]
        self.weight.data[:part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if get_state().tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.window_start
        inside = (local >= 0) & (local < self.vocab_local)
        out = F.embedding(local.clamp(0, self.vocab_local - 1), self.weight) * inside.unsqueeze(-1)
        return tp_all_reduce(out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return tp_all_gather_last(F.linear(h, self.weight))[..., :self.vocab]
