"""Model math of the built-in engine: norms, RoPE, attention paths, MoE paths, HF-directory loading."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from foundry_sglang.engine import LLM, EngineArgs, SamplingParams
from foundry_sglang.engine.attention import paged_decode_attention_torch, prefill_attention
from foundry_sglang.engine.config import ConfigError, builtin_config
from foundry_sglang.engine.model import RMSNorm, RotaryEmbedding, random_weights


def test_rmsnorm_matches_naive():
    x = torch.randn(5, 32)
    norm = RMSNorm(32, 1e-6, torch.float32, "cpu")
    norm.weight.data = torch.rand(32)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref)


def test_rope_matches_rotate_half_reference():
    d, theta = 16, 10000.0
    rope = RotaryEmbedding(d, 64, theta, "cpu")
    x = torch.randn(7, 3, d)
    pos = torch.tensor([0, 1, 2, 5, 9, 33, 63])
    out = rope(pos, x)
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None].float() * inv[None, :]
    emb = torch.cat([ang, ang], -1)[:, None, :]
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    torch.testing.assert_close(out, x * emb.cos() + rot * emb.sin(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], x[0])  # position 0 is the identity


def _paged_setup(seq_lens, page=4, hkv=2, d=8, pages=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(pages * page, hkv, d, generator=g)
    v_cache = torch.randn(pages * page, hkv, d, generator=g)
    perm = torch.randperm(pages - 1, generator=g) + 1
    width = max(-(-n // page) for n in seq_lens)
    tables, used = [], 0
    for n in seq_lens:
        k = -(-n // page)
        tables.append(perm[used:used + k].tolist() + [0] * (width - k))
        used += k
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32)


def _sdpa_reference(q, k_cache, v_cache, tables, seq_lens, page):
    outs = []
    group = q.shape[1] // k_cache.shape[1]
    for b, n in enumerate(seq_lens.tolist()):
        slots = torch.tensor([tables[b, t // page].item() * page + t % page for t in range(n)])
        k = k_cache[slots].transpose(0, 1).repeat_interleave(group, 0)
        v = v_cache[slots].transpose(0, 1).repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q[b][:, None, :], k, v)  # [Hq, 1, D]
        outs.append(o[:, 0])
    return torch.stack(outs)


def test_paged_decode_torch_matches_sdpa():
    page, seq_lens = 4, [1, 5, 13, 8]
    k_cache, v_cache, tables, lens = _paged_setup(seq_lens, page)
    q = torch.randn(len(seq_lens), 4, 8)
    out = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, page, 1 / math.sqrt(8))
    torch.testing.assert_close(out, _sdpa_reference(q, k_cache, v_cache, tables, lens, page), rtol=1e-5, atol=1e-5)


def test_prefill_attention_is_causal_sdpa_per_sequence():
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    out = prefill_attention(q, k, v, [0, 4, 9], 1 / math.sqrt(8))
    for s, e in [(0, 4), (4, 9)]:
        ref = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1).repeat_interleave(2, 0),
                                             v[s:e].transpose(0, 1).repeat_interleave(2, 0), is_causal=True)
        torch.testing.assert_close(out[s:e], ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


_TRITON_CHECK = r"""
import math, torch, sys
sys.path.insert(0, sys.argv[1])
from tests.engine.test_engine_model import _paged_setup
from foundry_sglang.engine.attention import paged_decode_attention_torch
from foundry_sglang.engine.triton_decode import paged_decode_attention
page, seq_lens = 4, [1, 5, 37, 8]
k_cache, v_cache, tables, lens = _paged_setup(seq_lens, page, hkv=2, d=16, pages=40)
q = torch.randn(len(seq_lens), 8, 16)
ref = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, page, 0.25)
out = paged_decode_attention(q, k_cache, v_cache, tables, lens, page, 0.25)
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
print("TRITON_OK")
"""


def test_triton_paged_decode_kernel_in_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_CHECK, root], env=env, capture_output=True, text=True,
                       timeout=120, cwd=root)
    assert "TRITON_OK" in r.stdout, r.stderr[-3000:]


def test_preset_overrides_and_errors():
    cfg = builtin_config("builtin:qwen3-8b?num_hidden_layers=4")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (4, 4096, 8, 151936)
    moe = builtin_config("builtin:qwen3-30b-a3b")
    shape = (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.num_hidden_layers)
    assert shape == (128, 8, 768, 48)
    with pytest.raises(ConfigError, match="unknown preset"):
        builtin_config("builtin:nope")
    with pytest.raises(ConfigError, match="override"):
        builtin_config("builtin:tiny?bogus=1")


def _write_hf_dir(path, model_name, seed=5):
    """A HF-format directory holding the builtin preset's weights (config.json + safetensors)."""
    from safetensors.torch import save_file
    cfg = builtin_config(model_name)
    tensors = {n: t.contiguous() for n, t in random_weights(cfg, seed, "cpu", torch.float32)}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    d = {k: v for k, v in cfg.__dict__.items() if k != "architecture"}
    d["architectures"] = [cfg.architecture]
    d["model_type"] = "qwen3_moe" if cfg.is_moe else "qwen3"
    d["torch_dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    return cfg


@pytest.mark.parametrize("preset", ["builtin:tiny", "builtin:tiny-moe"])
def test_hf_directory_matches_builtin_and_transformers(tmp_path, preset):
    _write_hf_dir(str(tmp_path), preset, seed=5)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [200, 100, 50]]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(EngineArgs(model=preset, seed=5)) as a:
        ref = [o.token_ids for o in a.generate(prompts, sp)]
    with LLM(EngineArgs(model=str(tmp_path), tokenizer="builtin:bytes")) as b:
        out = [o.token_ids for o in b.generate(prompts, sp)]
        b.engine.add_request(prompts[0], SamplingParams(max_tokens=1, temperature=0))
        b.engine.step()
        ours = b.engine.last_logits[0].clone()
    assert out == ref
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompts[0]])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
