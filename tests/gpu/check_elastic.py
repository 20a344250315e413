"""GPU check of live elastic switches under client load (one command; verdict table last).

    PYTHONPATH=$PWD:$PYTHONPATH python3 tests/gpu/check_elastic.py --out DIR [--worker builtin|sglang]
        [--backend local|ray] [--share-gpu] [--standby N] [--models dense,moe]

``--worker builtin`` (default): the qwen3-8b-shaped preset with 4 layers, TP1 -> TP2 (captures and saves the TP2
archive) -> TP1 (restores) -> TP2 (restores). ``--worker sglang``: real SGLang servers (``foundry_sglang.launch``
with the plugin; SGLang and Ray staged as in docs/STAGING.md) on a Qwen3 model directory written here (a config
with the real shapes and fewer layers, a byte-level tokenizer, ``--load-format dummy`` weights): the dense model
switches TP1 -> TP2 -> TP1 and replicas 1 -> 2 -> 1, the MoE model EP1 -> EP2 -> EP1 (TP2/EP2: SGLang runs EP
inside the TP group). Each new SGLang process restores its graphs from the layout's archive once the layout has
run (``--foundry-mode auto``). Before the deployment, plain SGLang serves each layout once for the greedy
reference.

Clients stream and do not, greedy and sampled, for the whole run. Reported per switch: the phases (stop old,
start new, wait healthy, route) and the outcome; overall: failed requests (must be 0), greedy answers unlike
the reference (SGLang: the same layout's plain SGLang; built-in: the TP1 answer, informational as bf16 TP2 may
flip a token). ``--backend ray`` runs the controller as a Ray actor and every replica in a placement group (Ray
must be importable: docs/STAGING.md), and kills the controller once: Ray restarts it and it serves the layout
it had. ``--share-gpu`` (default with one visible GPU): two slots on GPU 0, so every rank and replica shares it
(SGLang ranks with ``--foundry-ranks-share-gpu``); say so with the results. Writes ``DIR/elastic.json`` in the
format of ``bench/elastic_standby_switch.py``, whose ``--plot`` draws it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repo, for --help without PYTHONPATH

LAYERS = {"dense": 4, "moe": 4}
#: Switches per model (the layout before the first is TP1/EP1, one replica).
STEPS = {"builtin": [{"tp": 2}, {"tp": 1}, {"tp": 2}],
         "dense": [{"tp": 2}, {"tp": 1}, {"replicas": 2}, {"replicas": 1}],
         "moe": [{"tp": 2, "ep": 2}, {"tp": 1, "ep": 1}]}
VOCAB = 512   # the written byte-level tokenizer's size, and so the model's vocabulary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/elastic-check"),
                    help="directory for logs, archives, models and elastic.json (default $OUT)")
    ap.add_argument("--worker", choices=("builtin", "sglang"), default="builtin", help="engine of every replica")
    ap.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="local processes (default) or Ray actors on placement groups")
    ap.add_argument("--share-gpu", action="store_true", default=None,
                    help="two slots on GPU 0: ranks and replicas share it (default when one GPU is visible)")
    ap.add_argument("--standby", type=int, default=0, help="warm standby workers (local backend; default 0)")
    ap.add_argument("--models", default="dense,moe", help="--worker sglang: models to run (dense, moe)")
    ap.add_argument("--model", default="builtin:qwen3-8b?num_hidden_layers=4",
                    help="--worker builtin: the preset served")
    ap.add_argument("--concurrency", type=int, default=6, help="concurrent clients during the switches")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra engine flag (repeatable)")
    ap.add_argument("--no-reference", action="store_true", help="--worker sglang: skip the plain SGLang servers")
    return ap.parse_args(argv)


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_ray(gpus: int):
    """Start a local Ray instance on this machine's GPUs; returns a verdict row, or None (reason printed)."""
    from foundry_sglang.proc import disable_nvls

    disable_nvls()            # the raylet and everything below it inherit this environment
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as err:
        print(f"check_elastic: --backend ray needs Ray ({err}); stage it (docs/STAGING.md) and source its env.sh",
              file=sys.stderr)
        return None
    ray.init(include_dashboard=False, log_to_driver=False)
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < gpus:
        ray.shutdown()
        print(f"check_elastic: Ray sees {have} GPU(s), the check needs {gpus}", file=sys.stderr)
        return None
    return (f"Ray {ray.__version__} backend", f"{have} GPU(s) in the local cluster", "info")


# -- SGLang models and their plain reference ----------------------------------------------------------------
def write_tokenizer(path: Path) -> None:
    """A byte-level tokenizer of VOCAB ids (256 bytes, ChatML specials, fillers): OpenAI routes need text."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(VOCAB - 259)]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 4096, "chat_template": template}))


def write_model(root: Path, kind: str) -> Path:
    from tests.gpu.check_sglang_server import MODELS

    path = root / f"qwen3-{kind}-{LAYERS[kind]}l"
    path.mkdir(parents=True, exist_ok=True)
    config = dict(MODELS[kind], num_hidden_layers=LAYERS[kind], vocab_size=VOCAB, bos_token_id=256,
                  eos_token_id=258)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    write_tokenizer(path)
    return path


def sglang_flags(share: bool) -> list:
    """SGLang's flags for every server here: check_sglang_server's, with the tokenizer and without host/log."""
    from tests.gpu.check_sglang_server import SERVER_FLAGS, SHARED_MEMORY_FLAGS

    flags, rest = [], list(SERVER_FLAGS)
    while rest:
        flag = rest.pop(0)
        if flag in ("--host", "--log-level"):
            rest.pop(0)                   # and its value: the workers choose their own
        elif flag != "--skip-tokenizer-init":
            flags.append(flag)
    return flags + (SHARED_MEMORY_FLAGS if share else [])


def layout_flags(layout) -> list:
    return ["--tp-size", str(layout[0]), "--ep-size", str(layout[1])]


def plain_reference(model: Path, layout, out: Path, share: bool, max_tokens: int) -> dict:
    """Greedy answers of plain SGLang (Foundry off) in ``layout`` (tp, ep), for every prompt the load sends."""
    import urllib.request

    from bench.elastic_standby_switch import PROMPTS
    from tests.gpu.check_sglang_server import PREFILL_PIN, Server, free_port, server_env

    port = free_port()
    cmd = [sys.executable, "-m", "foundry_sglang.launch", "--foundry-engine", "sglang", "--foundry-mode", "off",
           *(["--foundry-ranks-share-gpu"] if share and layout[0] > 1 else []), "--model-path", str(model),
           "--host", "127.0.0.1", "--port", str(port), *layout_flags(layout), *sglang_flags(share), *PREFILL_PIN]
    env = server_env(0)
    env["CUDA_VISIBLE_DEVICES"] = "0" if share else ",".join(str(g) for g in range(max(layout)))
    server = Server(f"plain-{model.name}-tp{layout[0]}ep{layout[1]}", cmd, env, out / "plain.log", port)
    try:
        server.wait_healthy(600)
        answers = {}
        for prompt in PROMPTS:
            body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(server.base + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                answers[prompt] = json.loads(r.read())["choices"][0]["text"]
        return answers
    finally:
        server.stop()


# -- one elastic run --------------------------------------------------------------------------------------
def run_deployment(args, name: str, model: str, steps: list, references: dict, share: bool, out: Path) -> tuple:
    """Serve ``model`` elastically under load through ``steps``; returns (rows, bench-format mode record)."""
    from bench.elastic_standby_switch import Load, counts
    from foundry_sglang.elastic.deployment import DeploymentConfig, ElasticDeployment
    from foundry_sglang.graphs.settings import FoundryConfig

    extra = list(args.engine_arg) + (sglang_flags(share) if args.worker == "sglang" else [])
    if share and args.backend == "ray":
        placement = dict(slots_per_gpu=2)            # each slot half of GPU 0
    else:
        placement = dict(gpu_ids=[0, 0] if share else [0, 1])
    cfg = DeploymentConfig(model=model, slots=2, tp=1, replicas=1, device="cuda", kind=args.worker,
                           backend=args.backend, port=0, foundry=FoundryConfig.resolve("auto", out / "archives"),
                           log_dir=str(out / "logs"), extra_args=extra, start_timeout=600, queue_timeout=900,
                           standby=args.standby, **placement)
    rows, switches = [], []
    layouts = {1: (1, 1)}        # generation -> (tp, ep)

    def expected(replica, prompt, stream):
        if not replica:
            return None
        layout = layouts.get(int(replica.split(":")[0]))
        return (references.get(layout) or {}).get(prompt)

    dep = ElasticDeployment(cfg)
    t_start = time.monotonic()
    url = dep.start()
    rows.append((f"{name}: first start TP1 (capture + save)", f"{time.monotonic() - t_start:.1f}s", "info"))
    t0 = time.monotonic()
    load = Load(url, t0, args.concurrency, args.max_tokens, expected=expected if references else None)
    try:
        with load:
            for target in steps:
                time.sleep(3.0)
                t_submit = time.monotonic()
                job = dep.reconfigure(**target)
                layouts[job["generation"] or 0] = (job["to"]["tp"], job["to"]["ep"])
                switches.append({"name": f"{job['from']['tp']}/{job['from']['ep']}x{job['from']['replicas']} -> "
                                         f"{job['to']['tp']}/{job['to']['ep']}x{job['to']['replicas']}",
                                 "strategy": job["strategy"], "state": job["state"], "phases_s": job["phases_s"],
                                 "total_s": job["total_s"], "t_submit": round(t_submit - t0, 3),
                                 "t_done": round(time.monotonic() - t0, 3)})
                label = f"{name}: switch TP/EP x replicas {switches[-1]['name']} ({job['strategy']})"
                rows.append((label, f"{job['total_s']:.2f}s", "PASS" if job["state"] == "succeeded" else "FAIL"))
                rows.append(("  phases (s)", " ".join(f"{k}={v:.2f}" for k, v in job["phases_s"].items()), "info"))
            if args.backend == "ray":
                rows.append(restart_controller(dep, t0, switches))
            time.sleep(3.0)
    finally:
        status = dep.status()
        dep.stop()
    c = counts(load.records, switches)
    rows.append((f"{name}: workers ran on backend", str(status.get("backend")),
                 "PASS" if status.get("backend") == args.backend else "FAIL"))
    rows.append((f"{name}: requests ok / failed", f"{c['ok']} / {c['failed']}",
                 "PASS" if c["ok"] and not c["failed"] else "FAIL"))
    judge = "plain SGLang of the same layout" if args.worker == "sglang" else "the TP1 answer (informational)"
    judged = bool(references) or args.worker == "builtin"
    verdict = "info" if not judged else "PASS" if not c["greedy_mismatched"] else "WARN"
    rows.append((f"{name}: greedy answers unlike {judge}", str(c["greedy_mismatched"]), verdict))
    return rows, {"mode": name, "switches": switches, "requests": load.records, "counts": c,
                  "standby": status.get("standby")}


def restart_controller(dep, t0: float, switches: list) -> tuple:
    """Kill the Ray controller actor (Ray restarts it) and wait until it serves its layout again."""
    import ray

    layout = dep.status()["layout"]
    t_kill = time.monotonic()
    ray.kill(dep._actor, no_restart=False)
    status = {}
    while not status.get("recovered") and time.monotonic() - t_kill < 600:
        time.sleep(1.0)
        try:
            if dep.supervise():
                status = dep.status()
        except ray.exceptions.RayActorError:
            pass
    took = time.monotonic() - t_kill
    switches.append({"name": "controller restarted", "strategy": "recover", "state": "done", "phases_s": {},
                     "total_s": round(took, 3), "t_submit": round(t_kill - t0, 3),
                     "t_done": round(t_kill - t0 + took, 3)})
    ok = status.get("layout") == layout and status.get("state") == "serving"
    return ("controller killed, restarted by Ray, serving its layout", f"{took:.1f}s", "PASS" if ok else "FAIL")


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = gpu_count()
    if gpus == 0:
        print("check_elastic: needs a CUDA GPU (none is visible here); nothing was run", file=sys.stderr)
        return 2
    share = gpus < 2 if args.share_gpu is None else args.share_gpu
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [("GPUs", f"{gpus} visible; {'slots share GPU 0' if share else 'one GPU per slot'}", "info")]
    if args.backend == "ray":
        ray_row = start_ray(1 if share else 2)
        if ray_row is None:
            return 2
        rows.append(ray_row)
    modes = []
    try:
        if args.worker == "builtin":
            r, mode = run_deployment(args, "builtin", args.model, STEPS["builtin"], {}, share, out / "builtin")
            rows += r
            modes.append(mode)
        for kind in ([] if args.worker == "builtin" else args.models.split(",")):
            work = out / kind
            work.mkdir(parents=True, exist_ok=True)
            model = write_model(work, kind)
            references = {}
            if not args.no_reference:
                layouts = [(1, 1)] + sorted({(s.get("tp", 1), s.get("ep", 1)) for s in STEPS[kind]} - {(1, 1)})
                for layout in layouts:
                    t = time.monotonic()
                    references[layout] = plain_reference(model, layout, work, share, args.max_tokens)
                    rows.append((f"{kind}: plain SGLang TP{layout[0]}/EP{layout[1]} reference",
                                 f"{time.monotonic() - t:.0f}s", "info"))
            r, mode = run_deployment(args, kind, str(model), STEPS[kind], references, share, work)
            rows += r
            modes.append(mode)
    finally:
        if args.backend == "ray":
            import ray

            ray.shutdown()
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_name(gpus, share),
            "commit": os.environ.get("FOUNDRY_COMMIT", ""), "model": args.worker, "backend": args.backend,
            "shared_gpu": share, "clients": args.concurrency}
    with open(out / "elastic.json", "w") as f:
        json.dump({"meta": meta, "modes": modes, "rows": rows}, f, indent=1)
    print(f"\nVERDICT elastic switches ({args.worker} workers, {args.backend} backend, "
          f"{'one shared GPU' if share else 'one GPU per slot'})")
    w = max(len(r[0]) for r in rows)
    for name, value, verdict in rows:
        print(f"{name:<{w}}  {verdict:<5} {value}")
    return 0 if all(v != "FAIL" for _, _, v in rows) else 1


def device_name(gpus: int, share: bool) -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)} x{gpus}{', slots share GPU 0' if share else ''}"


if __name__ == "__main__":
    sys.exit(main())
