"""Routed MoE on the GPU: correctness of the Triton grouped path and decode TPOT before vs after.

    python bench/moe_decode.py [--layers 48] [--out DIR]

1. One Qwen3-30B-A3B-shaped MoE layer (128 experts, top-8, hidden 2048, expert inter 768, bf16): the routed
   Triton path and the all-experts reference against an fp32 all-experts computation at bs 1/8/64/256 (both bf16
   paths must be equally close to it), then the routed layer captured in a CUDA graph: output poisoned before each
   replay, replay == eager bitwise, replay-to-replay bitwise, and new inputs (new routing) through the same graph.
2. The whole ``builtin:qwen3-30b-a3b`` model in the built-in engine: decode-step latency through CUDA graphs at
   bs 1/8/64/256 with every expert on every token (before) and with only the routed experts (after), captured in
   the same process; greedy tokens compared between the two.
Writes moe_decode.json and moe_decode.png to --out; verdict table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BS = [1, 8, 64, 256]


def layer_check(iters: int = 3) -> dict:
    import torch

    from foundry_sglang.engine.moe import all_experts_moe, grouped_moe_triton, select_experts

    torch.manual_seed(0)
    e, k, h, inter = 128, 8, 2048, 768
    dev = "cuda"
    gate = torch.randn(e, h, device=dev) * h ** -0.5
    w13 = (torch.randn(e, 2 * inter, h, device=dev) * h ** -0.5).bfloat16()
    w2 = (torch.randn(e, h, inter, device=dev) * (0.5 * inter ** -0.5)).bfloat16()
    out = {}
    for bs in BS:
        x = torch.randn(bs, h, device=dev).bfloat16()
        r = select_experts(x, gate, k, True, 0, e)
        truth = all_experts_moe(x.float(), w13.float(), w2.float(), r).float()
        routed = grouped_moe_triton(x, w13, w2, r).float()
        ref = all_experts_moe(x, w13, w2, r).float()
        scale = truth.abs().max().item()
        err_routed = (routed - truth).abs().max().item() / scale
        err_ref = (ref - truth).abs().max().item() / scale
        ok_close = bool(torch.allclose(routed, ref, rtol=2e-2, atol=2e-2 * scale))
        # graph: static input, poisoned output, replay == eager, replay == replay, new routing through the graph
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                grouped_moe_triton(static_x, w13, w2, select_experts(static_x, gate, k, True, 0, e))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = grouped_moe_triton(static_x, w13, w2, select_experts(static_x, gate, k, True, 0, e))
        replays, same_as_eager = [], True
        for i in range(iters):
            if i == iters - 1:  # last round: a different batch, so a different routing
                static_x.copy_(torch.randn(bs, h, device=dev).bfloat16())
            static_out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            eager = grouped_moe_triton(static_x, w13, w2, select_experts(static_x, gate, k, True, 0, e))
            same_as_eager &= bool(torch.equal(static_out, eager))
            replays.append(static_out.clone())
        out[str(bs)] = {"rel_err_routed_vs_fp32": err_routed, "rel_err_all_experts_vs_fp32": err_ref,
                        "routed_close_to_all_experts": ok_close, "graph_replay_equals_eager": same_as_eager,
                        "replay_deterministic": bool(torch.equal(replays[0], replays[1]))}
        del graph
    return out


def tpot(layers: int, iters: int) -> dict:
    import torch
    from cold_start import decode_inputs, fill_kv, median, timed_replays

    import foundry_sglang.engine.model as model_mod
    from foundry_sglang.engine.config import EngineArgs
    from foundry_sglang.engine.graphs import TorchGraphBackend
    from foundry_sglang.engine.model_runner import ModelRunner
    from foundry_sglang.engine.moe import all_experts_moe, routed_moe

    args = EngineArgs(model=f"builtin:qwen3-30b-a3b?num_hidden_layers={layers}", device="cuda", dtype="bfloat16",
                      max_num_seqs=256, max_model_len=4096, page_size=16, num_kv_pages=256 * 16 + 1, seed=0)
    runner = ModelRunner(args, rank=0, graph_backend=False)
    out = {"layers": layers, "weights_s": runner.weights_seconds, "ms": {}, "logits": {}}
    logits = {}
    with torch.inference_mode():
        for name, impl in (("all_experts", all_experts_moe), ("routed", routed_moe)):
            model_mod.routed_moe = impl
            backend = TorchGraphBackend()
            with backend.capture_session(torch.cuda.Stream(runner.device)):
                for bs in sorted(BS, reverse=True):
                    backend.capture_one(bs, lambda bs=bs: runner._decode_forward_static(bs))
            fill_kv(runner)
            for bs in BS:
                decode_inputs(runner, bs, seed=2)
                logits[name, bs] = backend.replay(bs).clone()
                out["ms"].setdefault(str(bs), {})[name] = median(timed_replays(backend, bs, iters, warmup=3))
            backend.cleanup()
        model_mod.routed_moe = routed_moe
    for bs in BS:
        a, b = logits["all_experts", bs], logits["routed", bs]
        out["ms"][str(bs)]["speedup"] = out["ms"][str(bs)]["all_experts"] / out["ms"][str(bs)]["routed"]
        out["logits"][str(bs)] = {"argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                                  "max_abs_diff": float((a - b).abs().max()), "max_abs": float(a.abs().max())}
    return out


def plot(doc: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ms = doc.get("tpot", {}).get("ms", {})
    if not ms:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bss = list(ms)
    xs = range(len(bss))
    ax.bar([x - 0.2 for x in xs], [ms[b]["all_experts"] for b in bss], 0.4, label="all experts (before)",
           color="#888888")
    ax.bar([x + 0.2 for x in xs], [ms[b]["routed"] for b in bss], 0.4, label="routed experts (after)",
           color="#2ca02c")
    for x, b in zip(xs, bss):
        ax.text(x + 0.2, ms[b]["routed"], f"{ms[b]['speedup']:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [f"bs {b}" for b in bss])
    ax.set_ylabel("decode step through CUDA graph (ms)")
    ax.set_title(f"Qwen3-30B-A3B shape, {doc['tpot']['layers']} layers: MoE decode TPOT")
    ax.legend()
    fig.suptitle(f"{doc['device']} · commit {doc['commit'][:10]} · {doc['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48, help="layers of the Qwen3-30B-A3B-shaped preset (48 = full)")
    ap.add_argument("--iters", type=int, default=30, help="timed graph replays per batch size and variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="directory for JSON and PNG")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG from a results JSON (next to it) and exit")
    a = ap.parse_args()
    if a.plot_only:
        src = Path(a.plot_only)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        return
    from tools.needs_gpu import exit_without_gpu

    exit_without_gpu()
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("FOUNDRY_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or "unknown"
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0), "commit": commit, "torch": torch.__version__}
    for name, fn in (("layer", layer_check), ("tpot", lambda: tpot(a.layers, a.iters))):
        try:
            doc[name] = fn()
        except Exception as e:  # report and go on: the other check may still run
            doc[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(doc[name]["traceback"], flush=True)
        torch.cuda.empty_cache()
    (out / "moe_decode.json").write_text(json.dumps(doc, indent=1))
    plot(doc, out / "moe_decode.png")
    print(f"\n=== routed MoE, {doc['device']}, commit {commit[:10]}, {doc['date']} ===")
    layer = doc["layer"]
    if "error" in layer:
        print(f"layer check: FAILED {layer['error']}")
    else:
        print("| bs | rel. err routed vs fp32 | rel. err all-experts vs fp32 | close | graph == eager | "
              "replay determ. |")
        print("|---|---|---|---|---|---|")
        for bs, v in layer.items():
            print(f"| {bs} | {v['rel_err_routed_vs_fp32']:.2e} | {v['rel_err_all_experts_vs_fp32']:.2e} | "
                  f"{v['routed_close_to_all_experts']} | {v['graph_replay_equals_eager']} | "
                  f"{v['replay_deterministic']} |")
    t = doc["tpot"]
    if "error" in t:
        print(f"TPOT: FAILED {t['error']}")
    else:
        print(f"\nTPOT, builtin:qwen3-30b-a3b, {t['layers']} layers, CUDA graphs (weights {t['weights_s']:.1f} s)")
        print("| bs | all experts (ms) | routed (ms) | speed-up | greedy tokens agree | max |logit diff| |")
        print("|---|---|---|---|---|---|")
        for bs, v in t["ms"].items():
            lg = t["logits"][bs]
            print(f"| {bs} | {v['all_experts']:.2f} | {v['routed']:.2f} | {v['speedup']:.1f}x | "
                  f"{lg['argmax_agree']:.3f} | {lg['max_abs_diff']:.3g} (of {lg['max_abs']:.3g}) |")


if __name__ == "__main__":
    main()
