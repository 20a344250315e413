"""Live elastic switches under client load (tests/gpu/test_elastic.py; by hand: tests/gpu/check_elastic.py).

Built-in workers (``worker="builtin"``): the qwen3-8b-shaped preset with 4 layers, TP1 -> TP2 (captures and saves
the TP2 archive) -> TP1 (restores) -> TP2 (restores). SGLang workers (``worker="sglang"``): real SGLang servers
(``foundry_sglang.launch`` with the plugin; SGLang and Ray staged as in docs/STAGING.md) on a Qwen3 model
directory written here (a config with the real shapes and fewer layers, a byte-level tokenizer so the OpenAI
routes serve text, ``--load-format dummy`` weights): the dense model switches TP1 -> TP2 -> TP1 and replicas
1 -> 2 -> 1, the MoE model EP1 -> EP2 -> EP1 (TP2/EP2: SGLang runs EP inside the TP group). A new SGLang process
restores its graphs from the layout's archive once the layout has run (``--foundry-mode auto``). Before the
deployment, plain SGLang serves each layout once for the greedy reference.

Clients stream and do not, greedy and sampled, for the whole run. Rows per switch: its phases (stop old, start new,
wait healthy, route) and outcome. After the switches (local backend) one replica is killed with SIGKILL: the time
until the controller has replaced it is a row. Overall: failed requests (must be 0, besides those running on the
killed replica) and greedy answers unlike the reference (SGLang: the same layout's plain SGLang; built-in: the TP1
answer, informational: bf16 TP2 may flip a token). ``backend="ray"`` runs the controller as a Ray actor and every
replica in a placement group, and kills the controller once: Ray restarts it and it must serve its layout again.
``share_gpu`` (default with one visible GPU): both slots on GPU 0, so every rank and replica shares it (SGLang ranks
with ``--foundry-ranks-share-gpu``). ``DIR/elastic.json`` is in the format of ``bench/elastic_standby_switch.py``,
whose ``--plot`` draws it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gpu.verdicts import Verdicts

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))    # bench/ (the client load), also without PYTHONPATH

LAYERS = {"dense": 4, "moe": 4}
#: Switches per model (the layout before the first is TP1/EP1, one replica).
STEPS = {"builtin": [{"tp": 2}, {"tp": 1}, {"tp": 2}],
         "dense": [{"tp": 2}, {"tp": 1}, {"replicas": 2}, {"replicas": 1}],
         "moe": [{"tp": 2, "ep": 2}, {"tp": 1, "ep": 1}]}
VOCAB = 512   # the written byte-level tokenizer's size, and so the model's vocabulary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tests/gpu/check_elastic.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/elastic-check"),
                    help="directory for logs, archives, models and elastic.json (default $OUT)")
    ap.add_argument("--worker", choices=("builtin", "sglang"), default="builtin", help="engine of every replica")
    ap.add_argument("--backend", choices=("local", "ray"), default="local",
                    help="local processes (default) or Ray actors on placement groups")
    ap.add_argument("--share-gpu", action="store_true", default=None,
                    help="two slots on GPU 0: ranks and replicas share it (default when one GPU is visible)")
    ap.add_argument("--standby", type=int, default=0, help="warm standby workers (either backend; default 0)")
    ap.add_argument("--standby-coreside", action="store_true",
                    help="standbys may also wait on serving slots (so TP2 -> TP1 finds one too; local backend)")
    ap.add_argument("--models", default="dense,moe", help="--worker sglang: models to run (dense, moe)")
    ap.add_argument("--model", default="builtin:qwen3-8b?num_hidden_layers=4",
                    help="--worker builtin: the preset served")
    ap.add_argument("--concurrency", type=int, default=6, help="concurrent clients during the switches")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra engine flag (repeatable)")
    ap.add_argument("--no-reference", action="store_true", help="--worker sglang: skip the plain SGLang servers")
    return ap


def start_ray(gpus: int) -> tuple:
    """Start a local Ray instance on this machine's GPUs; its row (name, ok, detail): INFO, or FAIL with why."""
    from foundry_sglang.proc import disable_nvls

    disable_nvls()            # the raylet and everything below it inherit this environment
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as err:
        return ("Ray backend", False, f"needs Ray ({err}); stage it (docs/STAGING.md) and source its env.sh")
    ray.init(include_dashboard=False, log_to_driver=False)
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < gpus:
        ray.shutdown()
        return ("Ray backend", False, f"Ray sees {have} GPU(s), the check needs {gpus}")
    return (f"Ray {ray.__version__} backend", None, f"{have} GPU(s) in the local cluster")


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
    from gpu.sglang_servers import MODELS

    path = root / f"qwen3-{kind}-{LAYERS[kind]}l"
    path.mkdir(parents=True, exist_ok=True)
    config = dict(MODELS[kind], num_hidden_layers=LAYERS[kind], vocab_size=VOCAB, bos_token_id=256,
                  eos_token_id=258)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    write_tokenizer(path)
    return path


def sglang_flags(share: bool) -> list:
    """SGLang's flags for every server here: sglang_servers.py's, with the tokenizer and without host/log."""
    from gpu.sglang_servers import SERVER_FLAGS, SHARED_MEMORY_FLAGS

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
    from gpu.sglang_servers import PREFILL_PIN, Server, free_port, server_env

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
def run_deployment(args, name: str, model: str, steps: list, references: dict, share: bool, out: Path,
                   row) -> dict:
    """Serve ``model`` elastically under load through ``steps`` (rows through ``row``); its bench-format record."""
    from bench.elastic_standby_switch import Load, counts, wait_standby_ready
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
                           standby=args.standby, standby_coreside=args.standby_coreside, **placement)
    switches = []
    layouts = {1: (1, 1)}        # generation -> (tp, ep)

    def expected(replica, prompt, stream):
        layout = layouts.get(int(replica.split(":")[0])) if replica else None
        return (references.get(layout) or {}).get(prompt)

    dep = ElasticDeployment(cfg)
    t_start = time.monotonic()
    url = dep.start()
    row(f"{name}: first start TP1 (capture + save)", None, f"{time.monotonic() - t_start:.1f}s")
    t0 = time.monotonic()
    pool_off = False
    load = Load(url, t0, args.concurrency, args.max_tokens, expected=expected if references else None)
    try:
        with load:
            for target in steps:
                time.sleep(3.0)
                if args.standby and not pool_off:   # a switch onto a warm standby is what this case measures
                    try:
                        row("  standby pool warm after (s)", None, f"{wait_standby_ready(dep, timeout=240):.1f}")
                    except RuntimeError as err:   # the switch still runs, with fresh workers
                        row(f"{name}: standby pool warm before the switch", False, str(err)[:300])
                        pool_off = "disabled" in str(err)
                t_submit = time.monotonic()
                job = dep.reconfigure(**target)
                layouts[job["generation"] or 0] = (job["to"]["tp"], job["to"]["ep"])
                a, b = job["from"], job["to"]
                switches.append({"name": f"TP{a['tp']}/EP{a['ep']}x{a['replicas']} -> "
                                         f"TP{b['tp']}/EP{b['ep']}x{b['replicas']}",
                                 "strategy": job["strategy"], "state": job["state"], "phases_s": job["phases_s"],
                                 "total_s": job["total_s"], "t_submit": round(t_submit - t0, 3),
                                 "t_done": round(time.monotonic() - t0, 3)})
                row(f"{name}: {switches[-1]['name']} ({job['strategy']})", job["state"] == "succeeded",
                    f"{job['total_s']:.2f}s")
                row("  phases (s)", None, " ".join(f"{k}={v:.2f}" for k, v in job["phases_s"].items()))
            if args.backend == "ray":
                row(*restart_controller(dep, t0, switches))
            else:
                row(*replace_killed_replica(dep, t0, switches, name))
            time.sleep(3.0)
    finally:
        status = dep.status()
        dep.stop()
    c = counts(load.records, switches)
    if args.standby:
        sb = status.get("standby") or {}
        row(f"{name}: replicas started from a standby / fallbacks / never healthy",
            sb.get("used", 0) > 0 and not sb.get("fallbacks") and not sb.get("never_healthy"),
            f"{sb.get('used', 0)} / {sb.get('fallbacks', 0)} / {sb.get('never_healthy', 0)}"
            + (f"; pool disabled: {sb['disabled']}" if sb.get("disabled") else ""))
    row(f"{name}: workers ran on backend", status.get("backend") == args.backend, str(status.get("backend")))
    unexplained = c["failed"] - c["failed_on_killed_replica"] - c["failed_during_controller_restart"]
    row(f"{name}: requests ok / failed", bool(c["ok"]) and not unexplained,
        f"{c['ok']} / {c['failed']} ({c['failed_on_killed_replica']} were running on the replica killed on purpose, "
        f"{c['failed_during_controller_restart']} were sent or running while the controller restarted)")
    judge = "plain SGLang of the same layout" if args.worker == "sglang" else "the TP1 answer"
    judged = bool(references) or args.worker == "builtin"
    row(f"{name}: greedy answers unlike {judge}", None if not judged else (not c["greedy_mismatched"]) or "WARN",
        str(c["greedy_mismatched"]))
    return {"mode": name, "switches": switches, "requests": load.records, "counts": c,
            "standby": status.get("standby")}


def replace_killed_replica(dep, t0: float, switches: list, name: str) -> tuple:
    """SIGKILL one serving replica outside a switch; its row: replaced and serving again (time), or FAIL."""
    from bench.elastic_standby_switch import kill_one_replica

    time.sleep(3.0)
    try:
        switches.append(kill_one_replica(dep, t0))
    except RuntimeError as err:
        return (f"{name}: replica killed outside a switch, replaced", False, str(err))
    return (f"{name}: replica killed outside a switch, replaced", True, f"{switches[-1]['total_s']:.1f}s")


def restart_controller(dep, t0: float, switches: list) -> tuple:
    """Kill the Ray controller actor (Ray restarts it) and wait until it serves its layout again; its row."""
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
    return ("controller killed, restarted by Ray, serving its layout", ok, f"{took:.1f}s")


def run_switches(out: str, backend: str = "local", standby: int = 0, worker: str = "builtin",
                 share_gpu: bool | None = None, models: str = "dense,moe", *extra: str) -> dict:
    """The whole check in this process (``extra``: more check_elastic.py flags); {"rows", "figures"}."""
    args = build_parser().parse_args(["--out", str(out), "--backend", backend, "--standby", str(standby),
                                      "--worker", worker, "--models", models, *extra])
    import torch

    gpus = torch.cuda.device_count()
    share = gpus < 2 if share_gpu is None else share_gpu
    verdicts = Verdicts(f"elastic switches ({worker} workers, {backend} backend, "
                        f"{'one shared GPU' if share else 'one GPU per slot'})")
    row = verdicts.row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    row("GPUs", None, f"{gpus} visible; {'both slots on GPU 0' if share else 'one GPU per slot'}")
    modes = []
    if args.backend == "ray" and row(*start_ray(1 if share else 2)).verdict == "FAIL":
        return {"rows": verdicts.rows, "figures": {}}
    def one_model(kind: str) -> None:
        if kind == "builtin":
            modes.append(run_deployment(args, "builtin", args.model, STEPS["builtin"], {}, share, out / "builtin",
                                        row))
            return
        work = out / kind
        work.mkdir(parents=True, exist_ok=True)
        model = write_model(work, kind)
        references = {}
        if not args.no_reference:
            for layout in [(1, 1)] + sorted({(s.get("tp", 1), s.get("ep", 1)) for s in STEPS[kind]} - {(1, 1)}):
                t = time.monotonic()
                references[layout] = plain_reference(model, layout, work, share, args.max_tokens)
                row(f"{kind}: plain SGLang TP{layout[0]}/EP{layout[1]} reference", None, f"{time.monotonic() - t:.0f}s")
        modes.append(run_deployment(args, kind, str(model), STEPS[kind], references, share, work, row))

    try:
        for kind in (["builtin"] if args.worker == "builtin" else args.models.split(",")):
            try:       # a model that fails is a FAIL row; the others still run and the records are written
                one_model(kind)
            except Exception as err:
                row(f"{kind}: deployment ran", False, f"{type(err).__name__}: {err}"[:400])
    finally:
        if args.backend == "ray":
            import shutil

            import ray

            ray.shutdown()
            try:   # the controller actor's log lives only in Ray's session folder
                shutil.copytree("/tmp/ray/session_latest/logs", out / "ray-logs", dirs_exist_ok=True)
            except OSError as err:
                row("Ray logs kept", None, f"not copied: {err}"[:200])
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": os.environ.get("FOUNDRY_COMMIT", ""),
            "device": f"{torch.cuda.get_device_name(0)} x{gpus}{', slots share GPU 0' if share else ''}",
            "model": args.worker, "backend": args.backend, "shared_gpu": share, "clients": args.concurrency}
    with open(out / "elastic.json", "w") as f:
        json.dump({"meta": meta, "modes": modes}, f, indent=1)
    return {"rows": verdicts.rows, "figures": {"elastic_json": str(out / "elastic.json"),
                                               "counts": {m["mode"]: m["counts"] for m in modes},
                                               "switches": {m["mode"]: m["switches"] for m in modes}}}
