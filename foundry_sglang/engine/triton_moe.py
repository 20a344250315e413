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

from .moe import ExpertGroups

BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _grouped_gemm_kernel(A, W, C, Rows, BlockExpert, RowsUsed, RowWeights, num_rows, N, K,
                         stride_am, stride_we, stride_wn, stride_cm,
                         ROWS_PER_A: tl.constexpr, SCALE_ROWS: tl.constexpr,
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
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_in[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, w)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SCALE_ROWS:
        acc = acc * tl.load(RowWeights + rows, mask=valid, other=0.0)[:, None]
    c_ptrs = C + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, groups: ExpertGroups, rows_per_a: int,
                 row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """For every grouped row r (a flat assignment index): ``c[r] = a[r // rows_per_a] @ w[expert(r)]^T``,
    times ``row_weights[r]`` when given. a [*, K], w [E, N, K], c [num_rows, N]; rows not in the layout are
    left untouched."""
    assert a.stride(1) == 1 and w.stride(2) == 1 and c.stride(1) == 1, "inner dimensions must be contiguous"
    num_rows, n = c.shape
    k = a.shape[1]
    grid = (groups.rows.numel() // groups.block_m, triton.cdiv(n, BLOCK_N))
    _grouped_gemm_kernel[grid](
        a, w, c, groups.rows, groups.block_expert, groups.rows_used,
        row_weights if row_weights is not None else c, num_rows, n, k,
        a.stride(0), w.stride(0), w.stride(1), c.stride(0),
        ROWS_PER_A=rows_per_a, SCALE_ROWS=row_weights is not None,
        BLOCK_M=groups.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3)
    return c
