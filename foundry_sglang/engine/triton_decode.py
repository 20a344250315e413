"""Triton paged decode attention (GQA), graph-safe: the KV length of each row is read on the device.

One program per (batch row, query head) walks its sequence's pages BLOCK_N tokens at a time with an online
softmax in fp32. Runs under ``TRITON_INTERPRET=1`` on the CPU too (the tests use that).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(Q, K, V, BlockTables, SeqLens, Out, scale,
                         stride_qb, stride_qh, stride_kt, stride_kh, stride_bt, stride_ob, stride_oh,
                         GROUP: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32)
    seq_len = tl.load(SeqLens + b)
    m = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < seq_len
        page = tl.load(BlockTables + b * stride_bt + offs_n // PAGE, mask=valid, other=0)
        slot = (page * PAGE + offs_n % PAGE).to(tl.int64)
        kv_off = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        denom = denom * alpha + tl.sum(p, axis=0)
        m = m_new
    out = acc / denom
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                           scale: float, out: torch.Tensor = None) -> torch.Tensor:
    """q [B, Hq, D]; k/v_cache [slots, Hkv, D]; block_tables [B, P] int32; seq_lens [B] int32 (>= 1)."""
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    _paged_decode_kernel[(B, Hq)](
        q, k_cache, v_cache, block_tables, seq_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, PAGE=page_size, D=D, BLOCK_N=32, num_warps=4)
    return out
