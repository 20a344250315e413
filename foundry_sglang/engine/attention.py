"""Attention over the paged KV cache: KV write, prefill (SDPA per sequence) and paged decode.

The KV cache is one tensor per layer and kind, shaped [num_pages * page_size, kv_heads, head_dim]; a token's
slot is ``page * page_size + offset``. Page 0 is never given to a sequence: padded decode rows write there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """What one forward needs besides token ids and positions.

    prefill: ``cu_seqlens`` (host list, prompts packed back to back); decode: ``block_tables`` [B, P] and
    ``seq_lens`` [B] (KV length including the new token) as device tensors. Both: ``slot_mapping`` [N].
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    cu_seqlens: Optional[List[int]] = None
    block_tables: Optional[torch.Tensor] = None
    seq_lens: Optional[torch.Tensor] = None
    page_size: int = 16
    use_triton: bool = False


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Graph-safe scatter of this step's keys/values into their slots."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def prefill_attention(q, k, v, cu_seqlens: List[int], scale: float) -> torch.Tensor:
    """Causal attention per packed sequence; q [N, Hq, D], k/v [N, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                                           is_causal=True, scale=scale)
        out[s:e] = o[0].transpose(0, 1)
    return out


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, page_size: int, scale: float):
    """Reference paged decode attention in plain torch (CPU path, capture-safe: no host syncs).

    Gathers every page in the block table, so its cost grows with the table width, not the true length.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    P = block_tables.shape[1]
    pages_k = k_cache.view(-1, page_size, Hkv, D)[block_tables.long()].reshape(B, P * page_size, Hkv, D)
    pages_v = v_cache.view(-1, page_size, Hkv, D)[block_tables.long()].reshape(B, P * page_size, Hkv, D)
    group = Hq // Hkv
    qg = q.view(B, Hkv, group, D).float()
    scores = torch.einsum("bhgd,bthd->bhgt", qg, pages_k.float()) * scale
    t = torch.arange(P * page_size, device=q.device)
    mask = t[None, :] >= seq_lens[:, None].long()
    scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, pages_v.float())
    return out.reshape(B, Hq, D).to(q.dtype)


def decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    if meta.use_triton:
        from .triton_decode import paged_decode_attention
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                      meta.page_size, scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                        meta.page_size, scale)
