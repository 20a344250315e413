"""How far two equally valid bf16 MoE computations drift apart over depth (CPU, a few minutes at most).

    python bench/moe_depth_drift.py [--layers 4,48]

A Qwen3-30B-A3B-like model cut to hidden 256 / 32 experts (random weights, bf16) runs one decode step at bs 64
three ways: routed experts, all experts in bf16 (the old path), and all experts in fp32 rounded to bf16 once.
The fp32-vs-bf16 pair differs only by rounding, so its disagreement is the noise floor that any two MoE
implementations share at that depth (top-k near-ties flip and random layers amplify the difference); the
routed-vs-reference comparison on the GPU (``moe_decode.py``) should be read against it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,48", help="comma list of layer counts")
    a = ap.parse_args()
    import torch
    from cold_start import decode_inputs, fill_kv

    import foundry_sglang.engine.model as model_mod
    from foundry_sglang.engine.config import EngineArgs
    from foundry_sglang.engine.model_runner import ModelRunner
    from foundry_sglang.engine.moe import all_experts_moe, routed_moe

    def all_experts_fp32(x, w13, w2, routing):
        return all_experts_moe(x.float(), w13.float(), w2.float(), routing).to(x.dtype)

    print("| layers | pair | greedy tokens agree | max abs logit diff |")
    print("|---|---|---|---|")
    for layers in [int(v) for v in a.layers.split(",")]:
        model = ("builtin:qwen3-30b-a3b?hidden_size=256&num_attention_heads=4&num_key_value_heads=2&head_dim=64"
                 f"&num_experts=32&moe_intermediate_size=64&vocab_size=320&num_hidden_layers={layers}")
        args = EngineArgs(model=model, device="cpu", dtype="bfloat16", max_num_seqs=64, max_model_len=4096,
                          page_size=16, num_kv_pages=64 * 16 + 1)
        runner = ModelRunner(args, graph_backend=False)
        out = {}
        with torch.inference_mode():
            for name, impl in (("routed", routed_moe), ("all_bf16", all_experts_moe), ("all_fp32", all_experts_fp32)):
                model_mod.routed_moe = impl
                fill_kv(runner)
                decode_inputs(runner, 64, seed=2)
                out[name] = runner._decode_forward_static(64, 16)
            model_mod.routed_moe = routed_moe
        for x, y in (("routed", "all_bf16"), ("all_fp32", "all_bf16")):
            agree = (out[x].argmax(-1) == out[y].argmax(-1)).float().mean().item()
            diff = (out[x] - out[y]).abs().max().item()
            print(f"| {layers} | {x} vs {y} | {agree:.3f} | {diff:.3g} (of {out[y].abs().max().item():.3g}) |")


if __name__ == "__main__":
    main()
