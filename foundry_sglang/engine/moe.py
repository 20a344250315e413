"""Routed mixture-of-experts: each token runs only through the experts it is routed to.

Four steps, all with shapes fixed by the token count alone and no host synchronisation, so a decode step that
contains them can be captured into a CUDA graph:

1. ``select_experts``: softmax router, top-k, optional renormalisation. Experts held by other expert-parallel
   ranks are sent to a *drop bucket* (id ``num_local``) and contribute nothing here; the all-reduce after the
   layer adds them from their own rank.
2. ``group_by_expert``: the N*k (token, slot) assignments are laid out expert by expert in blocks of ``block_m``
   rows, each expert's rows padded up to a whole block. The layout has a fixed maximum length
   (``max_grouped_rows``); blocks past the used length are skipped by the kernels.
3. Grouped GEMM, twice: for every row block, ``rows @ W[expert]^T``. First gate+up (rows gathered from the
   tokens), SiLU(gate) * up, then down, scaled by the routing weight of each assignment.
4. Sum of each token's k scaled rows.

``grouped_moe_triton`` runs step 3 as one Triton kernel launch per GEMM and, for decode sizes, steps 1 and 2 as
one launch each (GPU; also under ``TRITON_INTERPRET=1``);
``grouped_moe_torch`` is the same algorithm with a batched matmul per row block (CPU). ``all_experts_moe`` is
the reference that runs every local expert on every token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .moe_layout import ExpertGroups, group_by_expert, max_grouped_rows, pick_block_m

__all__ = ["ExpertGroups", "Routing", "all_experts_moe", "group_by_expert", "grouped_moe_torch", "grouped_moe_triton",
           "max_grouped_rows", "pick_block_m", "routed_moe", "select_experts"]


@dataclass
class Routing:
    """Top-k routing of N tokens onto one rank's experts."""

    weights: torch.Tensor  # [N, k] float32 combine weights
    ids: torch.Tensor      # [N, k] int64 local expert ids; num_local (the drop bucket) for other ranks' experts
    num_local: int


def select_experts(x: torch.Tensor, gate: torch.Tensor, top_k: int, renormalize: bool,
                   first_expert: int | torch.Tensor, num_local: int) -> Routing:
    """Qwen3-MoE routing: softmax over all experts in fp32, top-k, optionally renormalised over the k.

    ``first_expert``: this rank's first expert; pass it as a one-element device tensor so that captured graphs
    hold no rank-dependent kernel argument (comm_patch restores one EP rank's graphs on the others).
    On CUDA softmax, top-k and renormalisation are one Triton launch after the router GEMM."""
    logits = F.linear(x.float(), gate.float())
    if x.is_cuda:
        from .triton_moe import fused_route

        weights, ids = fused_route(logits, top_k, renormalize, first_expert, num_local)
        return Routing(weights=weights, ids=ids, num_local=num_local)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    local = ids - first_expert
    inside = (local >= 0) & (local < num_local)
    return Routing(weights=weights * inside, ids=torch.where(inside, local, num_local), num_local=num_local)


def grouped_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The routed algorithm with one batched matmul per GEMM over the row blocks (CPU path; gathers each
    block's expert weights, so it suits small models only)."""
    n, k = routing.ids.shape
    groups = group_by_expert(routing.ids, routing.num_local, pick_block_m(n * k, routing.num_local))
    bm = groups.block_m
    rows = groups.rows.long()
    valid = rows < n * k                                               # padding rows hold n * k
    safe = torch.where(valid, rows, 0)
    a = x[safe // k].reshape(-1, bm, x.shape[1])                       # [blocks, bm, H]
    experts = groups.block_expert.long()
    gu = torch.bmm(a, w13[experts].transpose(1, 2))                    # [blocks, bm, 2I]
    g, u = gu.chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, w2[experts].transpose(1, 2))         # [blocks, bm, H]
    scale = routing.weights.reshape(-1)[safe] * valid
    out = torch.zeros(n * k + 1, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, torch.where(valid, rows, n * k), y.reshape(-1, x.shape[1]).float() * scale.unsqueeze(1))
    return out[:n * k].reshape(n, k, -1).sum(1).to(x.dtype)


def grouped_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The routed algorithm with the Triton grouped GEMM (graph-safe); grouping in one launch up to
    ``MAX_FUSED_ASSIGNMENTS`` assignments, as torch ops above."""
    from .triton_moe import MAX_FUSED_ASSIGNMENTS, fused_group, grouped_gemm

    n, k = routing.ids.shape
    group = fused_group if n * k <= MAX_FUSED_ASSIGNMENTS else group_by_expert
    groups = group(routing.ids, routing.num_local, pick_block_m(n * k, routing.num_local))
    act = torch.empty(n * k, w13.shape[1] // 2, dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, act, groups, rows_per_a=k, gated=True)                 # SiLU(gate) * up, fused
    y = torch.zeros(n * k, w2.shape[1], dtype=torch.float32, device=x.device)  # dropped rows stay 0
    grouped_gemm(act, w2, y, groups, rows_per_a=1, row_weights=routing.weights.reshape(-1))
    return y.view(n, k, -1).sum(1).to(x.dtype)


def all_experts_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Reference: every local expert on every token (one bmm), weighted by the dense routing matrix."""
    n, e = x.shape[0], routing.num_local
    comb = torch.zeros(n, e + 1, dtype=torch.float32, device=x.device)
    comb.scatter_add_(1, routing.ids, routing.weights)
    gu = torch.bmm(x.unsqueeze(0).expand(e, -1, -1), w13.transpose(1, 2))
    g, u = gu.chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, w2.transpose(1, 2))                   # [E, N, H]
    return (y.float() * comb[:, :e].t().unsqueeze(-1)).sum(0).to(x.dtype)


def routed_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, routing: Routing) -> torch.Tensor:
    """This rank's share of the MoE output: the Triton path on CUDA, the torch path elsewhere."""
    if x.is_cuda:
        return grouped_moe_triton(x, w13, w2, routing)
    return grouped_moe_torch(x, w13, w2, routing)
