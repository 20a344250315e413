"""Command-line flags of the built-in engine's server, kept free of heavy imports.

``python -m foundry_sglang.engine`` parses them before it imports torch, so that a Foundry LOAD can start preparing
while the rest of the engine is imported (``foundry_sglang.builtin.early``); the server, the launcher and the
elastic workers share them. :func:`engine_args_from` resolves the Foundry flags once into ``EngineArgs.foundry``.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import List

from foundry_sglang.graphs.settings import FoundryConfig, add_foundry_flags

from .config import ConfigError, EngineArgs

__all__ = ["LOG_FORMAT", "ServerLimits", "add_engine_args", "build_arg_parser", "configure_logging",
           "engine_args_from"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class ServerLimits:
    """What one client may hold or send (``--help`` of the server lists them as flags)."""

    max_queued_requests: int = 1024   # requests waiting beyond --max-running-requests; more: 503 + Retry-After
    header_timeout: float = 30.0      # a connection must send complete request headers within this (seconds)
    body_timeout: float = 30.0        # and then its body within this (408 otherwise)
    max_body_bytes: int = 32 * 2 ** 20



def _int_list(what: str, example: str, minimum: int):
    """An argparse type: a comma- or space-separated list of integers >= ``minimum``."""
    def parse(text: str) -> List[int]:
        try:
            values = [int(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} like {example!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be {minimum} or more")
        return values
    return parse


_bs_list = _int_list("batch sizes", "1,2,4,8", 1)
_gpu_id_list = _int_list("GPU indices", "0,1", 0)  # not the batch-size rule: an elastic TP=2 worker gets "0,1"


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Engine flags (SGLang spelling), shared by the server, the launcher and the elastic workers."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model-path", "--model", dest="model", default="builtin:tiny",
                   help="HuggingFace-format directory (config.json, *.safetensors, tokenizer) or builtin:PRESET "
                        "(tiny, tiny-moe, qwen3-8b, qwen3-30b-a3b; override fields like "
                        "builtin:qwen3-8b?num_hidden_layers=4). Default: builtin:tiny")
    g.add_argument("--tokenizer-path", dest="tokenizer", default=None,
                   help="tokenizer directory if different from the model (default: the model's)")
    g.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1,
                   help="tensor-parallel degree (attention and dense MLP split over ranks)")
    g.add_argument("--ep", "--ep-size", dest="ep", type=int, default=1,
                   help="expert-parallel degree: 1 or equal to --tp (or alone: world size = max(tp, ep))")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight/activation dtype (auto: float32 on CPU, the config's dtype or bfloat16 on GPU)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (auto: cuda when available)")
    g.add_argument("--max-running-requests", dest="max_num_seqs", type=int, default=256,
                   help="most sequences decoded together (also the static decode buffer size)")
    g.add_argument("--context-length", dest="max_model_len", type=int, default=None,
                   help="max prompt+output tokens per request (default: the model's max positions)")
    g.add_argument("--max-prefill-tokens", dest="max_num_batched_tokens", type=int, default=8192,
                   help="most prompt tokens prefilled in one step (raised to the context length if lower)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    g.add_argument("--num-kv-pages", type=int, default=None,
                   help="KV-cache pages (forces a fixed, reproducible size; default: from "
                        "--mem-fraction-static on GPU, 64 MiB on CPU, capped at what the requests can use)")
    g.add_argument("--mem-fraction-static", dest="gpu_memory_fraction", type=float, default=0.85,
                   help="fraction of GPU memory for weights and KV cache when --num-kv-pages is not given")
    g.add_argument("--cuda-graph-max-bs-decode", "--cuda-graph-max-bs", dest="cuda_graph_max_bs", type=int,
                   default=None, help="largest decode batch captured as a CUDA graph (default 256)")
    g.add_argument("--cuda-graph-bs-decode", "--cuda-graph-bs", dest="cuda_graph_bs", type=_bs_list,
                   default=None, help="decode batch sizes to capture (default SGLang's H200 list "
                                      "1,2,4,8,12,16,24,...,256)")
    g.add_argument("--gpu-ids", type=_gpu_id_list, default=None,
                   help="comma-separated GPU index per rank (default: rank r on GPU r); repeating an index puts "
                        "several ranks on one GPU (NCCL then runs over sockets; for tests)")
    g.add_argument("--disable-cuda-graph", action="store_true", help="decode eagerly on the GPU")
    g.add_argument("--random-seed", dest="seed", type=int, default=0,
                   help="seed of the builtin: random weights")
    g.add_argument("--served-model-name", default=None, help="model id reported by the API (default: --model)")
    add_foundry_flags(g)
    return parser


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """EngineArgs of parsed server flags, the Foundry settings resolved (ConfigError, one line, when they do not
    fit together)."""
    fields = EngineArgs.__dataclass_fields__
    try:
        foundry = FoundryConfig.from_flags(ns)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in fields}, foundry=foundry)


def build_arg_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix is never taken for a flag (a standby's "--standb" must not mean --standby).
    p = argparse.ArgumentParser(prog="python -m foundry_sglang.engine", allow_abbrev=False,
                                description="OpenAI-compatible server of the built-in Foundry engine "
                                            "(Qwen3 dense/MoE, TP/EP, paged KV, CUDA-graph decode).")
    add_engine_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=30000, help="port (0 picks a free one; default 30000)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging level")
    d = ServerLimits()
    s.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="requests that may wait beyond --max-running-requests; more get 503 with Retry-After "
                        f"(default {d.max_queued_requests})")
    s.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection has to send complete request headers (also the idle keep-alive "
                        f"time; default {d.header_timeout:g})")
    s.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help=f"seconds a request body may take to arrive; then 408 (default {d.body_timeout:g})")
    s.add_argument("--standby", action="store_true",
                   help="start as a standby: import torch and the engine, start the rank forkserver and (with "
                        "--device cuda) the CUDA context, then read one JSON line {\"argv\": [...]} of server "
                        "arguments from stdin and serve with them (the elastic controller's warm pool)")
    return p


def configure_logging(level: str) -> None:
    """The server's logging set-up (``--log-level``); a no-op once logging is configured."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
