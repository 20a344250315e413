"""Triton grouped GEMM over expert-grouped rows (the routed MoE's two matmuls), graph-safe.

One program per (row block, column block): it reads the block's expert and row indices from device memory,
returns at once when the block lies past the layout's used rows, and otherwise computes
``C[rows] = A[rows // rows_per_a] @ W[expert]^T`` (optionally scaled per row). The launch grid depends only on
the maximum layout size, so one captured graph serves every routing. Runs under ``TRITON_INTERPRET=1`` too.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .moe_layout import ExpertGroups, max_grouped_rows

BLOCK_N = 64
BLOCK_K = 64
SMALL_GRID = 132  # below twice this many programs (an H100/H200 has 132 SMs) the column tiles are halved


@triton.jit
def _grouped_gemm_kernel(A, W, C, Rows, BlockExpert, RowsUsed, RowWeights, num_rows, N, K,
                         stride_am, stride_we, stride_wn, stride_cm,
                         ROWS_PER_A: tl.constexpr, SCALE_ROWS: tl.constexpr, GATED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(RowsUsed):
        return
    rows = tl.load(Rows + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < num_rows
    a_rows = (rows // ROWS_PER_A).to(tl.int64)
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = W + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_in[None, :], other=0.0)
        w_mask = k_in[:, None] & (offs_n[None, :] < N)
        acc += tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0))
        if GATED:  # the up projection sits N rows below the gate projection
            acc_up += tl.dot(a, tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0))
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up
    if SCALE_ROWS:
        acc = acc * tl.load(RowWeights + rows, mask=valid, other=0.0)[:, None]
    c_ptrs = C + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, groups: ExpertGroups, rows_per_a: int,
                 row_weights: Optional[torch.Tensor] = None, gated: bool = False) -> torch.Tensor:
    """For every grouped row r (a flat assignment index): ``c[r] = a[r // rows_per_a] @ w[expert(r)]^T``,
    times ``row_weights[r]`` when given. a [*, K], w [E, N, K], c [num_rows, N]; rows not in the layout are
    left untouched. ``gated``: w is [E, 2N, K] (gate rows, then up rows) and c gets SiLU(gate) * up."""
    assert a.stride(1) == 1 and w.stride(2) == 1 and c.stride(1) == 1, "inner dimensions must be contiguous"
    num_rows, n = c.shape
    assert w.shape[1] == (2 * n if gated else n), "weight rows do not match the output width"
    k = a.shape[1]
    blocks = groups.rows.numel() // groups.block_m
    block_n = BLOCK_N if blocks * triton.cdiv(n, BLOCK_N) >= 2 * SMALL_GRID else BLOCK_N // 2  # fill the GPU
    grid = (blocks, triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, c, groups.rows, groups.block_expert, groups.rows_used,
        row_weights if row_weights is not None else c, num_rows, n, k,
        a.stride(0), w.stride(0), w.stride(1), c.stride(0),
        ROWS_PER_A=rows_per_a, SCALE_ROWS=row_weights is not None, GATED=gated,
        BLOCK_M=groups.block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)
    return c


# -- routing and grouping in two launches (decode sizes) ---------------------------------------------------------
@triton.jit
def _route_kernel(Logits, Weights, Ids, First, num_experts, num_local, stride_l,
                  TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALIZE: tl.constexpr):
    """One program per token: softmax over the router logits, top-k by repeated argmax (ties: lowest id),
    optional renormalisation, other ranks' experts to the drop bucket ``num_local`` with weight 0."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    x = tl.load(Logits + t * stride_l + offs, mask=offs < num_experts, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    slots = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)
        w = tl.where(slots == j, best, w)
        ids = tl.where(slots == j, idx, ids)
        p = tl.where(offs == idx, -1.0, p)
    if RENORMALIZE:
        w = w / tl.sum(tl.where(slots < TOP_K, w, 0.0), axis=0)
    local = ids - tl.load(First).to(tl.int32)  # device data: the graph holds no rank-dependent argument
    inside = (local >= 0) & (local < num_local)
    keep = slots < TOP_K
    tl.store(Weights + t * TOP_K + slots, tl.where(inside, w, 0.0), mask=keep)
    tl.store(Ids + t * TOP_K + slots, tl.where(inside, local, num_local).to(tl.int64), mask=keep)


@triton.jit
def _group_kernel(Ids, Rows, BlockExpert, RowsUsed, Scratch, num_assign, max_rows, num_blocks,
                  NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, LOG_E: tl.constexpr):
    """One program: the same layout as ``moe_layout.group_by_expert`` (stable by assignment index) through a sort of
    (expert, index) keys. Scratch holds [padded ends | unpadded starts | padded starts] of the experts."""
    a = tl.arange(0, BLOCK_A)
    valid = a < num_assign
    ids = tl.load(Ids + a, mask=valid, other=NUM_EXPERTS).to(tl.int32)   # beyond the assignments: drop bucket
    e = tl.arange(0, BLOCK_E)
    counts = tl.histogram(ids, BLOCK_E)
    counts = tl.where(e < NUM_EXPERTS, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(RowsUsed, tl.sum(padded, axis=0))
    tl.store(Scratch + e, ends)
    tl.store(Scratch + BLOCK_E + e, tl.cumsum(counts, axis=0) - counts)
    tl.store(Scratch + 2 * BLOCK_E + e, ends - padded)
    r = tl.arange(0, BLOCK_R)
    tl.store(Rows + r, tl.zeros([BLOCK_R], dtype=tl.int32) + num_assign, mask=r < max_rows)
    tl.debug_barrier()
    # expert of each row block: the first expert whose padded end lies beyond the block's first row
    b = tl.arange(0, BLOCK_B)
    lo = tl.zeros([BLOCK_B], dtype=tl.int32)
    hi = tl.zeros([BLOCK_B], dtype=tl.int32) + NUM_EXPERTS
    for _ in tl.static_range(LOG_E):
        mid = (lo + hi) // 2
        end = tl.load(Scratch + mid, mask=mid < NUM_EXPERTS, other=0)
        beyond = end > b * BLOCK_M
        hi = tl.where(beyond & (lo < hi), mid, hi)
        lo = tl.where(~beyond & (lo < hi), mid + 1, lo)
    tl.store(BlockExpert + b, tl.minimum(lo, NUM_EXPERTS - 1), mask=b < num_blocks)
    # stable grouping: sort keys expert * BLOCK_A + index; position minus the expert's start is the rank
    keys = tl.sort(ids * BLOCK_A + a)
    kid = keys // BLOCK_A
    kidx = keys % BLOCK_A
    local = kid < NUM_EXPERTS
    start = tl.load(Scratch + BLOCK_E + kid, mask=local, other=0)
    dest = tl.load(Scratch + 2 * BLOCK_E + kid, mask=local, other=0) + (a - start)
    tl.store(Rows + dest, kidx, mask=local)


def fused_route(logits: torch.Tensor, top_k: int, renormalize: bool, first_expert, num_local: int):
    """(weights [N, k] fp32, local ids [N, k] int64) from router logits [N, E]; one launch. ``first_expert``: a
    one-element integer tensor on the logits' device (or an int, copied to one)."""
    n, num_experts = logits.shape
    if not isinstance(first_expert, torch.Tensor):
        first_expert = torch.full((1,), first_expert, dtype=torch.int64, device=logits.device)
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    if n:
        _route_kernel[(n,)](logits, weights, ids, first_expert, num_experts, num_local, logits.stride(0),
                            TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
                            BLOCK_E=triton.next_power_of_2(num_experts), RENORMALIZE=renormalize, num_warps=4)
    return weights, ids


def fused_group(ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertGroups:
    """``moe_layout.group_by_expert`` in one launch (for up to ``MAX_FUSED_ASSIGNMENTS`` assignments)."""
    n = ids.numel()
    max_rows = max_grouped_rows(n, num_experts, block_m)
    dev = ids.device
    rows = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=dev)
    rows_used = torch.empty(1, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(num_experts + 1)
    scratch = torch.empty(3 * block_e, dtype=torch.int32, device=dev)
    _group_kernel[(1,)](ids, rows, block_expert, rows_used, scratch, n, max_rows, max_rows // block_m,
                        NUM_EXPERTS=num_experts, BLOCK_M=block_m, BLOCK_A=triton.next_power_of_2(max(n, 2)),
                        BLOCK_E=block_e, BLOCK_R=triton.next_power_of_2(max_rows),
                        BLOCK_B=triton.next_power_of_2(max(max_rows // block_m, 2)),
                        LOG_E=max(1, num_experts.bit_length()), num_warps=8)
    return ExpertGroups(rows=rows, block_expert=block_expert, rows_used=rows_used, block_m=block_m)


#: Above this many (token, expert) assignments grouping runs as torch ops (long prefills); one program below.
MAX_FUSED_ASSIGNMENTS = 4096
