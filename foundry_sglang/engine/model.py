"""Qwen3 (dense) and Qwen3-MoE decoder models with TP/EP layers, plus their weight sources.

Weights always arrive as FULL HuggingFace-named tensors (from safetensors files or a seeded generator) and each
layer keeps its own shard, so every parallel layout computes with the same numbers.
"""
from __future__ import annotations

import glob
import logging
import math
import os
import re
import zlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, decode_attention, prefill_attention, write_kv
from .config import ModelConfig
from .moe import Routing, routed_moe, select_experts
from .parallel import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_reduce_world,
    divide,
    get_state,
)

log = logging.getLogger("foundry_sglang.engine")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE with a precomputed cos/sin table indexed by position (graph-safe)."""

    def __init__(self, head_dim: int, max_pos: int, theta: float, device):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [N, H, D]; positions [N]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, dtype, device):
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
                                          dtype, device)
        self.n_q = self.qkv_proj.n_q_local
        self.n_kv = self.qkv_proj.n_kv_local
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, dtype, device)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device)
        self.rope = rope
        self.scale = 1.0 / math.sqrt(d)
        self.k_cache: Optional[torch.Tensor] = None  # set by the model runner
        self.v_cache: Optional[torch.Tensor] = None

    def forward(self, positions, x, meta: AttentionMetadata):
        n, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_q * d, self.n_kv * d, self.n_kv * d], dim=-1)
        q = self.rope(positions, self.q_norm(q.reshape(n, self.n_q, d)))
        k = self.rope(positions, self.k_norm(k.reshape(n, self.n_kv, d)))
        v = v.reshape(n, self.n_kv, d)
        write_kv(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        if meta.is_prefill:
            o = prefill_attention(q, k, v, meta.cu_seqlens, self.scale)
        else:
            o = decode_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.reshape(n, self.n_q * d))


class Qwen3MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype, device):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter], dtype, device)
        self.down_proj = RowParallelLinear(inter, hidden, dtype, device)

    def forward(self, x):
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(g) * u)


class Qwen3MoE(nn.Module):
    """Top-k routed experts. With ep > 1 each rank holds num_experts/ep whole experts; otherwise every rank
    holds all experts with their intermediate dim split over TP. Partial outputs are summed by one all-reduce.

    Only the routed experts run (``moe.routed_moe``: grouping by expert and a grouped GEMM), with fixed shapes
    and no host syncs, so prefill and CUDA-graph decode share one path.
    """

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        st = get_state()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk = cfg.norm_topk_prob
        inter = cfg.moe_intermediate_size
        if st.ep > 1:
            self.n_local = divide(cfg.num_experts, st.ep, "num_experts")
            self.e_start, self.inter_local, self.inter_rank = st.ep_rank * self.n_local, inter, 0
        else:
            self.n_local, self.e_start = cfg.num_experts, 0
            self.inter_local, self.inter_rank = divide(inter, st.tp, "moe_intermediate_size"), st.tp_rank
        h = cfg.hidden_size
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, h, dtype=dtype, device=device), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(self.n_local, 2 * self.inter_local, h, dtype=dtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.n_local, h, self.inter_local, dtype=dtype, device=device),
                               requires_grad=False)
        # First local expert as device data (not a kernel argument): EP graphs stay rank-independent.
        self.register_buffer("expert_start", torch.full((1,), self.e_start, dtype=torch.int64, device=device),
                             persistent=False)

    def load_expert(self, expert: int, which: str, full: torch.Tensor) -> None:
        e = expert - self.e_start
        if not 0 <= e < self.n_local:
            return
        n, r = self.inter_local, self.inter_rank
        if which == "down_proj":
            self.w2.data[e].copy_(full[:, r * n:(r + 1) * n])
        else:
            off = 0 if which == "gate_proj" else n
            self.w13.data[e, off:off + n].copy_(full[r * n:(r + 1) * n])

    def routing(self, x: torch.Tensor) -> Routing:
        return select_experts(x, self.gate, self.top_k, self.norm_topk, self.expert_start, self.n_local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_world(routed_moe(x, self.w13, self.w2, self.routing(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, rope, dtype, device):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, rope, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.is_moe = cfg.layer_is_moe(i)
        self.mlp = (Qwen3MoE(cfg, dtype, device) if self.is_moe
                    else Qwen3MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device))

    def forward(self, positions, h, meta: AttentionMetadata):
        h = h + self.self_attn(positions, self.input_layernorm(h), meta)
        x = self.post_attention_layernorm(h)
        return h + self.mlp(x)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device):
        super().__init__()
        self.cfg = cfg
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, device)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i, rope, dtype, device)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = (self.embed_tokens if cfg.tie_word_embeddings
                        else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device))

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(positions, h, meta)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden).float()

    # -- weights ----------------------------------------------------------------------------------
    _LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
    _EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")

    def load_weight(self, name: str, full: torch.Tensor) -> bool:
        """Load one full HF-named tensor into its shard; returns False for names this model does not use."""
        full = full.to(self.norm.weight.device)
        if name == "model.embed_tokens.weight":
            self.embed_tokens.weight_loader(full)
        elif name == "lm_head.weight":
            if self.cfg.tie_word_embeddings:
                return False
            self.lm_head.weight_loader(full)
        elif name == "model.norm.weight":
            self.norm.weight.data.copy_(full)
        else:
            m = self._LAYER.fullmatch(name)
            if not m or int(m.group(1)) >= len(self.layers):
                return False
            layer, rest = self.layers[int(m.group(1))], m.group(2)
            attn = layer.self_attn
            simple = {"input_layernorm.weight": layer.input_layernorm.weight,
                      "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
                      "self_attn.q_norm.weight": attn.q_norm.weight,
                      "self_attn.k_norm.weight": attn.k_norm.weight}
            qkv = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 2}
            if rest in simple:
                simple[rest].data.copy_(full)
            elif rest in qkv:
                attn.qkv_proj.weight_loader(full, qkv[rest])
            elif rest == "self_attn.o_proj.weight":
                attn.o_proj.weight_loader(full)
            elif layer.is_moe:
                e = self._EXPERT.fullmatch(rest)
                if rest == "mlp.gate.weight":
                    layer.mlp.gate.data.copy_(full)
                elif e:
                    layer.mlp.load_expert(int(e.group(1)), e.group(2), full)
                else:
                    return False
            elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                layer.mlp.gate_up_proj.weight_loader(full, 0 if "gate" in rest else 1)
            elif rest == "mlp.down_proj.weight":
                layer.mlp.down_proj.weight_loader(full)
            else:
                return False
        return True


def weight_specs(cfg: ModelConfig) -> Iterator[Tuple[str, Tuple[int, ...], float]]:
    """(HF name, full shape, init std) of every tensor; std 0 means 'ones' (norm weights).

    Scales keep activations O(1) and make the LM head peaky, so greedy decoding of a random model is not
    dominated by near-ties (which bf16 noise would flip).
    """
    h, d = cfg.hidden_size, cfg.head_dim
    yield "model.embed_tokens.weight", (cfg.vocab_size, h), 1.0
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,), 0.0
        yield p + "post_attention_layernorm.weight", (h,), 0.0
        yield p + "self_attn.q_proj.weight", (cfg.num_attention_heads * d, h), h ** -0.5
        yield p + "self_attn.k_proj.weight", (cfg.num_key_value_heads * d, h), h ** -0.5
        yield p + "self_attn.v_proj.weight", (cfg.num_key_value_heads * d, h), h ** -0.5
        yield p + "self_attn.o_proj.weight", (h, cfg.num_attention_heads * d), \
            0.5 * (cfg.num_attention_heads * d) ** -0.5
        yield p + "self_attn.q_norm.weight", (d,), 0.0
        yield p + "self_attn.k_norm.weight", (d,), 0.0
        if cfg.layer_is_moe(i):
            inter = cfg.moe_intermediate_size
            yield p + "mlp.gate.weight", (cfg.num_experts, h), h ** -0.5
            for e in range(cfg.num_experts):
                yield p + f"mlp.experts.{e}.gate_proj.weight", (inter, h), h ** -0.5
                yield p + f"mlp.experts.{e}.up_proj.weight", (inter, h), h ** -0.5
                yield p + f"mlp.experts.{e}.down_proj.weight", (h, inter), 0.5 * inter ** -0.5
        else:
            inter = cfg.intermediate_size
            yield p + "mlp.gate_proj.weight", (inter, h), h ** -0.5
            yield p + "mlp.up_proj.weight", (inter, h), h ** -0.5
            yield p + "mlp.down_proj.weight", (h, inter), 0.5 * inter ** -0.5
    yield "model.norm.weight", (h,), 0.0
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, h), 3.0 * h ** -0.5


def random_weights(cfg: ModelConfig, seed: int, device, dtype) -> Iterator[Tuple[str, torch.Tensor]]:
    """Seeded full tensors, one generator per tensor name: identical on every rank and layout
    (for a given device type)."""
    for name, shape, std in weight_specs(cfg):
        if std == 0.0:
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
        yield name, torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(std).to(dtype)


def safetensors_weights(path: str, device) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def expected_names(cfg: ModelConfig) -> List[str]:
    return [n for n, _, _ in weight_specs(cfg)]
