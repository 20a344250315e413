"""Fidelity with third-party model code: transformers' own Qwen3 and Qwen3-MoE modeling classes (small
random-weight configs), static-cache decode graphs over several batch sizes, two successive steps per input set,
SAVE and LOAD in fresh processes, logits bitwise.
"""
from __future__ import annotations

import os
import time

import pytest

from gpu.bitwise import digest, poison
from gpu.fidelity import KEY, SEEDS, Runner, outcome

pytestmark = pytest.mark.gpu


QWEN_BS = [8, 4, 1]
QWEN_CACHE_LEN = 64


def qwen_init(kind: str, device: int):
    import torch
    import transformers

    common = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if kind == "dense":
        cfg = transformers.Qwen3Config(intermediate_size=512, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                          norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
        cfg._experts_implementation = "batched_mm"  # index-select of expert weights: no host syncs, capturable
    cfg._attn_implementation = "sdpa"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    torch.manual_seed(1234)
    model = cls(cfg).to(device=device, dtype=torch.bfloat16).eval()
    caches, ids, pos, cpos, mask = {}, {}, {}, {}, {}
    for bs in QWEN_BS:
        cache = transformers.StaticCache(config=cfg, max_cache_len=QWEN_CACHE_LEN)
        if hasattr(cache, "early_initialization"):
            cache.early_initialization(batch_size=bs, num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                                       dtype=torch.bfloat16, device=device)
        caches[bs] = cache
        ids[bs] = torch.zeros(bs, 1, dtype=torch.long, device=device)
        pos[bs] = torch.zeros(bs, 1, dtype=torch.long, device=device)
        cpos[bs] = torch.zeros(1, dtype=torch.long, device=device)
        mask[bs] = torch.zeros(bs, 1, 1, QWEN_CACHE_LEN, dtype=torch.bool, device=device)
        mask[bs][..., 0] = True

    def forward(bs):
        with torch.no_grad():
            out = model(input_ids=ids[bs], position_ids=pos[bs], cache_position=cpos[bs], attention_mask=mask[bs],
                        past_key_values=caches[bs], use_cache=True)
        return out.logits

    def set_step(bs, tokens, p):
        ids[bs].copy_(tokens.view(bs, 1))
        pos[bs].fill_(p)
        cpos[bs].fill_(p)
        mask[bs].zero_()
        mask[bs][..., : p + 1] = True

    def reset_cache(bs):
        for layer in caches[bs].layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    t.zero_()

    return forward, set_step, reset_cache, model


def qwen_steps(kind, run_graph, set_step, reset_cache):
    """Per input set and batch size: two successive decode steps (the second reads the KV the first wrote)."""
    import torch

    hashes = {}
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        p = 3 + seed % 17
        for bs in QWEN_BS:
            reset_cache(bs)
            tokens = torch.randint(0, 512, (bs,), generator=g)
            for step in range(2):
                set_step(bs, tokens.cuda(), p + step)
                logits = run_graph(bs)
                hashes[f"{seed}/bs{bs}/step{step}"] = digest(logits)
                tokens = logits[:, -1].float().argmax(-1).cpu()
    return hashes


def child_qwen_save(archive, result, kind):
    import torch

    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="save", key=f"{KEY}-{kind}", progress=False).open()
        forward, set_step, reset_cache, _ = qwen_init(kind, s.device)
        graphs = {}
        t0 = time.perf_counter()
        with s.capture_phase():
            for bs in QWEN_BS:
                graphs[bs] = s.capture(f"decode_bs{bs}", lambda bs=bs: forward(bs))
        capture_s = time.perf_counter() - t0
        outs = {g.key: g.outputs for g in s.captured}
        s.save()

        def run_graph(bs):
            poison(outs[f"decode_bs{bs}"])
            graphs[bs].replay()
            return outs[f"decode_bs{bs}"]

        hashes = qwen_steps(kind, run_graph, set_step, reset_cache)
        deterministic = True  # the same step replayed twice on the same state gives the same logits
        for bs in QWEN_BS:
            reset_cache(bs)
            set_step(bs, torch.arange(bs).cuda(), 4)
            first = digest(run_graph(bs))
            deterministic &= first == digest(run_graph(bs))
        return {"hashes": hashes, "deterministic": deterministic, "capture_s": capture_s,
                "stale_words": s.save_stats.get("stale_words") or 0, "archive_mb": os.path.getsize(archive) / 1e6}

    outcome(run, result)


def child_qwen_load(archive, result, kind):
    import foundry_core as fc

    def run():
        s = fc.Session(archive, mode="load", key=f"{KEY}-{kind}", progress=False).open()
        _, set_step, reset_cache, _ = qwen_init(kind, s.device)
        restored = s.restore()

        def run_graph(bs):
            rg = restored[f"decode_bs{bs}"]
            poison(rg.outputs)
            rg.replay()
            return rg.outputs

        hashes = qwen_steps(kind, run_graph, set_step, reset_cache)
        st = s.restore_stats
        return {"hashes": hashes, "nodes": st.num_nodes, "layout_ms": st.layout_seconds * 1e3,
                "layout_records": st.layout_records}

    outcome(run, result)


def check_qwen(r: Runner, kind: str) -> list[tuple[str, str, str]]:
    name = f"transformers Qwen3{'-MoE' if kind == 'moe' else ''} decode, bs {QWEN_BS}"
    archive = str(r.out / f"qwen-{kind}.foundry")
    gpu = 0 if kind == "dense" else 1 % r.gpus
    save = r.child(f"qwen-{kind}-save", child_qwen_save, archive, kind, timeout=300, gpu=gpu)
    if save.get("error"):
        return [(name, "FAIL", "SAVE: " + save["error"][:400])]
    load = r.child(f"qwen-{kind}-load", child_qwen_load, archive, kind, timeout=300, gpu=gpu)
    if load.get("error"):
        return [(name, "FAIL", "LOAD: " + load["error"][:400])]
    eq = sum(load["hashes"][k] == v for k, v in save["hashes"].items())
    good = eq == len(save["hashes"]) and len(save["hashes"]) == len(SEEDS) * len(QWEN_BS) * 2
    return [(name, "PASS" if good else "FAIL",
             f"{eq}/{len(save['hashes'])} (input sets x bs x 2 steps) bitwise; SAVE deterministic "
             f"{save['deterministic']}; {load['nodes']} nodes; stale words ignored {save['stale_words']:.0f}; "
             f"layout check {load['layout_ms']:.3f} ms / {load['layout_records']} records")]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_transformers_qwen_decode_restores_bitwise(kind, fidelity, verdicts):
    fidelity(check_qwen, kind)
    verdicts.assert_passed()
