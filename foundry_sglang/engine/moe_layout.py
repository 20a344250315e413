"""The expert-grouped row layout of the routed MoE: N*k (token, slot) assignments laid out expert by expert in
blocks of ``block_m`` rows, with a fixed maximum length so that a captured graph serves every routing.

Shared by the torch path (:func:`group_by_expert`, ``moe.py``) and the Triton kernels (``triton_moe.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertGroups", "group_by_expert", "max_grouped_rows", "pick_block_m"]


@dataclass
class ExpertGroups:
    """Assignments grouped by expert in blocks of ``block_m`` rows (fixed maximum shapes)."""

    rows: torch.Tensor          # [max_rows] int32: flat assignment index token*k + slot; N*k marks padding
    block_expert: torch.Tensor  # [max_rows // block_m] int32: the expert of each row block
    rows_used: torch.Tensor     # [1] int32: rows of the layout in use (a multiple of block_m)
    block_m: int


def pick_block_m(num_assignments: int, num_experts: int) -> int:
    """Rows per block: small when experts get few rows each (decode), larger for long prefills."""
    per_expert = num_assignments / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def max_grouped_rows(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded layout: at most min(assignments, experts) experts are non-empty, and each
    wastes fewer than block_m rows."""
    bound = num_assignments + min(num_assignments, num_experts) * (block_m - 1)
    return -(-bound // block_m) * block_m


def group_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertGroups:
    """Stable grouping of the assignments ``ids`` [N, k] (values 0..num_experts, the last being the drop
    bucket) by expert, without host syncs: a one-hot running count gives each assignment its rank inside its
    expert, padded per-expert offsets give its row."""
    flat = ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    onehot = torch.zeros(n, num_experts + 1, dtype=torch.int32, device=dev)
    onehot.scatter_(1, flat.unsqueeze(1), 1)
    running = onehot.cumsum(0, dtype=torch.int32)
    rank = running.gather(1, flat.unsqueeze(1)).squeeze(1) - 1
    counts = running[-1, :num_experts].long()
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    max_rows = max_grouped_rows(n, num_experts, block_m)
    starts = torch.cat([ends.new_zeros(1), ends[:-1], ends.new_full((1,), max_rows)])  # drop bucket -> spill row
    dest = starts[flat] + rank * (flat < num_experts)
    rows = torch.full((max_rows + 1,), n, dtype=torch.int32, device=dev)
    rows.scatter_(0, dest, torch.arange(n, dtype=torch.int32, device=dev))
    block_start = torch.arange(0, max_rows, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1)
    return ExpertGroups(rows=rows[:max_rows], block_expert=block_expert.to(torch.int32),
                        rows_used=ends[-1:].to(torch.int32), block_m=block_m)
