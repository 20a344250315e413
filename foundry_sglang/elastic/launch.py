"""``python -m foundry_sglang.launch --model M --elastic ...``: an elastic deployment from the command line.

Starts (or joins) Ray, the controller actor with its router on ``--host:--port``, and the first generation;
then serves until SIGINT/SIGTERM. ``--backend local`` runs without Ray (workers are child processes).
Engine flags that are not elastic flags are passed to every engine process (``--engine-arg`` or after ``--``).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

from foundry_sglang import jsonsafe
from foundry_sglang.graphs.settings import ENV_ARCHIVE, ENV_MODE, MODE_HELP, FoundryConfig, add_foundry_flags
from foundry_sglang.proc import ELASTIC_API_TOKEN_ENV, port_problem

from .deployment import ControllerLost, DeploymentConfig, ElasticDeployment
from .layout import Layout, LayoutError, resolve_model_shape, validate_layout

log = logging.getLogger("foundry_sglang.elastic.launch")

SUPERVISE_INTERVAL_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m foundry_sglang.launch --elastic",
        description="Serve a model as an elastic deployment whose TP/EP degree and replica count change live "
                    "(POST /reconfigure). Inference: /v1/completions, /v1/chat/completions; admin: /status, "
                    "/reconfigure; /health, /metrics.")
    p.add_argument("--elastic", action="store_true", help="accepted for the launcher's sake (always on here)")
    p.add_argument("--model", "--model-path", dest="model", default="builtin:tiny",
                   help="model: builtin:NAME preset or a HuggingFace directory (default builtin:tiny)")
    p.add_argument("--slots", type=int, default=None,
                   help="GPUs (or CPU slots with --device cpu) the deployment may use; default: tp*replicas")
    p.add_argument("--tp", type=int, default=1, help="initial tensor-parallel degree per replica (default 1)")
    p.add_argument("--ep", type=int, default=1, help="initial expert-parallel degree per replica (default 1)")
    p.add_argument("--replicas", type=int, default=1, help="initial number of replicas (default 1)")
    p.add_argument("--worker", dest="kind", choices=["builtin", "sglang"], default="builtin",
                   help="engine per replica: the built-in engine or SGLang through our plugin (default builtin)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="where engines run (default cuda)")
    p.add_argument("--gpu-ids", default=None,
                   help="comma-separated GPU ids for --backend local (default 0..slots-1)")
    p.add_argument("--slots-per-gpu", type=int, default=1, metavar="N",
                   help="N slots share each GPU, so ranks and replicas fit on fewer GPUs (one GPU: --slots 2 "
                        "--slots-per-gpu 2); SGLang ranks on one GPU run with --foundry-ranks-share-gpu (default 1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="router bind address (default 127.0.0.1); on any other address set --api-token, or anyone "
                        "who can reach the port can reconfigure the deployment (a warning says so at start)")
    p.add_argument("--port", type=int, default=8000, help="router port, also serving the admin API (default 8000)")
    p.add_argument("--api-token", default=os.environ.get(ELASTIC_API_TOKEN_ENV),
                   help=f"bearer token required by /reconfigure and /status (default: ${ELASTIC_API_TOKEN_ENV}; "
                        "none: open)")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: controller and workers are Ray actors in placement groups; local: child processes")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    add_foundry_flags(p, archive_help=f"root directory of graph archives, one subdirectory per layout (default: "
                                      f"${ENV_ARCHIVE}, which the launcher sets from its own --foundry-archive; "
                                      "none: no archives). Ignored with --device cpu (no CUDA graphs there)",
                      mode_help=f"archive mode passed to every engine (default: ${ENV_MODE}). {MODE_HELP}")
    p.add_argument("--log-dir", default=None, help="write each engine process's output to a file here")
    p.add_argument("--queue-limit", type=int, default=1024, help="requests that may wait during a switch gap")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a request waits for a serving generation before a 503 (default 300)")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds a new generation has to become healthy before rollback (default 600)")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds the old generation's in-flight requests get before it is stopped (default 600)")
    p.add_argument("--policy", default=None,
                   help='JSON enabling the load policy, e.g. \'{"scale_up": {"replicas": 2}, "queue_high": 8}\' '
                        "(fields of foundry_sglang.elastic.policy.PolicyConfig; default: off)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every engine process (repeatable; or put them after --)")
    p.add_argument("--standby", type=int, default=0, metavar="N",
                   help="keep N warm standby workers of the --worker kind on free slots, each holding its "
                        "slot/GPU: torch and the server imported, a forkserver for its rank processes (SGLang: "
                        "with the scheduler side imported), CUDA up; a switch or scale-up hands one its layout "
                        "instead of starting a process. Refilled after every job, never serving capacity, "
                        "reported in /status and /metrics. On Ray each standby holds one slot in a placement "
                        "group of its own, and a replica's other ranks are placed on its node (default 0: off)")
    p.add_argument("--standby-coreside", action="store_true",
                   help="let a standby also wait on a slot that serves (it holds its imports and a CUDA context "
                        "there, no weights), so that a switch which stops every serving replica, such as TP2 -> TP1 "
                        "on two GPUs, still finds a warm engine. Needs --standby N and --backend local")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(args: argparse.Namespace, extra: List[str]) -> DeploymentConfig:
    for name in ("tp", "ep", "replicas"):
        if getattr(args, name) < 1:
            raise LayoutError(f"--{name} must be >= 1")
    policy = None
    if args.policy:
        try:
            policy = jsonsafe.loads(args.policy)
        except jsonsafe.MalformedJSON as exc:
            raise LayoutError(f"--policy is not valid JSON: {exc}") from None
        if not isinstance(policy, dict):
            raise LayoutError("--policy must be a JSON object")
    if args.slots_per_gpu < 1:
        raise LayoutError("--slots-per-gpu must be >= 1")
    if args.standby < 0:
        raise LayoutError("--standby must be >= 0")
    if args.standby_coreside and not args.standby:
        raise LayoutError("--standby-coreside needs --standby N")
    if args.standby_coreside and args.backend != "local":
        raise LayoutError("--standby-coreside needs --backend local (a Ray standby holds a slot of its own)")
    gpu_ids = [int(g) for g in args.gpu_ids.split(",") if g.strip()] if args.gpu_ids else None
    slots = args.slots or max(args.tp, args.ep) * args.replicas
    try:
        foundry = FoundryConfig.from_flags(args, env_defaults=True)
    except ValueError as exc:
        raise LayoutError(str(exc)) from None
    return DeploymentConfig(
        model=args.model, slots=slots, tp=args.tp, ep=args.ep, replicas=args.replicas, kind=args.kind,
        device=args.device, gpu_ids=gpu_ids, host=args.host, port=args.port, api_token=args.api_token,
        backend=args.backend, foundry=foundry if args.device == "cuda" else FoundryConfig(),
        extra_args=list(args.engine_arg) + list(extra), log_dir=args.log_dir, queue_limit=args.queue_limit,
        queue_timeout=args.queue_timeout, start_timeout=args.start_timeout, drain_timeout=args.drain_timeout,
        policy=policy, standby=args.standby, standby_coreside=args.standby_coreside,
        slots_per_gpu=args.slots_per_gpu)


def preflight(cfg: DeploymentConfig, ray_address: Optional[str]) -> None:
    """Check, before Ray or any engine starts, what would otherwise fail only after them (ValueError, one line):
    the router's port taken, GPUs asked for (``--device cuda``, the default) but absent on this machine."""
    problem = port_problem(cfg.host, cfg.port) if cfg.port else None
    if problem:
        raise ValueError(problem)
    if cfg.device != "cuda" or ray_address:   # a joined cluster's GPUs are on its own nodes
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device cuda (the default): no usable CUDA GPU on this machine; "
                         "use --device cpu to run the engines on CPU")
    gpus = -(-cfg.slots // cfg.slots_per_gpu)
    if not cfg.gpu_ids and torch.cuda.device_count() < gpus:
        raise ValueError(f"the deployment owns {cfg.slots} slots ({gpus} GPUs) but {torch.cuda.device_count()} "
                         f"GPU(s) are visible; lower --slots/--tp/--replicas or raise --slots-per-gpu")


def _one_line(exc: BaseException) -> str:
    exc = getattr(exc, "cause", None) or exc     # a Ray task error carries the original exception
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args, extra)
        if cfg.kind == "builtin" or cfg.model.startswith("builtin:") or os.path.isdir(cfg.model):
            validate_layout(Layout(cfg.tp, cfg.ep, cfg.replicas), resolve_model_shape(cfg.model), cfg.slots,
                            cfg.kind)     # before Ray starts: a bad layout is one line, not a traceback
        preflight(cfg, args.ray_address)
    except (LayoutError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if cfg.backend == "ray":
        import ray
        ray.init(address=args.ray_address, num_cpus=args.num_cpus, include_dashboard=False)
    dep = ElasticDeployment(cfg)
    try:
        url = dep.start()
    except Exception as exc:  # the first generation did not come up (slots, an engine, the port): one line
        log.error("cannot start: %s", _one_line(exc))
        log.debug("start-up failure", exc_info=True)
        dep.stop()
        _shutdown_ray(cfg)
        return 2 if isinstance(getattr(exc, "cause", None) or exc, ValueError) else 1
    print(f"elastic deployment serving on {url} (admin: {url}/status, {url}/reconfigure)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    status = 0
    while not done.wait(SUPERVISE_INTERVAL_S):
        try:
            dep.supervise()     # restarts the service of a controller that Ray restarted after a crash
        except ControllerLost as exc:
            log.error("%s", exc)
            status = 1
            break
    log.info("stopping")
    dep.stop()
    _shutdown_ray(cfg)
    return status


def _shutdown_ray(cfg: DeploymentConfig) -> None:
    if cfg.backend == "ray":
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
