"""OpenAI-compatible HTTP server of the built-in engine (aiohttp).

Endpoints: POST /v1/completions, POST /v1/chat/completions (``stream`` true: SSE ``data: {...}`` chunks ending
with ``data: [DONE]``), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Run: ``python -m foundry_sglang.engine --model builtin:tiny --port 30000``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from aiohttp import web

from foundry_sglang.graphs.settings import MODE_CHOICES, MODE_HELP
from foundry_sglang.proc import EXIT_WITH_PARENT_ENV, exit_with_parent

from .config import ConfigError, EngineArgs
from .engine import AsyncLLMEngine
from .metrics import Metrics
from .sampling import SamplingParams

log = logging.getLogger("foundry_sglang.engine.server")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_response(message: str, status: int, param: Optional[str] = None) -> web.Response:
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


# -- request parsing --------------------------------------------------------------------------------
def _number(body: Dict, key: str, default, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}", param=key)
    return v


def sampling_from_body(body: Dict, default_max_tokens: int) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int)
    if max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer", param="max_tokens")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings", param="stop")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise BadRequest("stop_token_ids must be a list of integers", param="stop_token_ids")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_number(body, "top_k", -1, int),
        seed=_number(body, "seed", None, int),
        stop=stop, stop_token_ids=stop_ids,
        ignore_eos=bool(body.get("ignore_eos", False)))
    try:
        params.validate()
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return params


class OpenAIServer:
    """HTTP handlers bound to one AsyncLLMEngine."""

    def __init__(self, engine: AsyncLLMEngine, served_model_name: Optional[str] = None):
        self.engine = engine
        self.model_name = served_model_name or engine.served_model_name
        self.aliases = {self.model_name, engine.engine.args.model}
        self.metrics = Metrics(engine.stats)
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=32 * 2 ** 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        generation = request.path in ("/v1/completions", "/v1/chat/completions")
        try:
            resp = await handler(request)
        except BadRequest as e:
            resp = error_response(str(e), e.status, e.param)
        except web.HTTPException as e:
            resp = error_response(f"{e.reason}: {request.method} {request.path}", e.status)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # one line to the client, the traceback to the log
            log.exception("request failed")
            resp = error_response(f"internal error: {type(e).__name__}: {e}", 500)
        if generation:
            self.metrics.request_done(resp.status)
        return resp

    async def _body(self, request: web.Request) -> Dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the JSON body must be an object")
        model = body.get("model")
        if model is not None and model not in self.aliases:
            raise BadRequest(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                             status=404, param="model")
        return body

    # -- endpoints --------------------------------------------------------------------------------
    async def health(self, request):
        if self.engine.error is not None:
            return error_response(f"engine failed: {self.engine.error}", 503)
        return web.Response(text="ok")

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "foundry",
            "max_model_len": self.engine.max_model_len}]})

    async def prometheus(self, request):
        body, ctype = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def completions(self, request):
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise BadRequest("prompt must be a string or a list of token ids (one prompt per request)",
                             param="prompt")
        if not isinstance(prompt, (str, list)):
            raise BadRequest("prompt must be a string or a list of token ids", param="prompt")
        params = sampling_from_body(body, 16)
        return await self._generate(request, body, prompt, params, chat=False)

    async def chat_completions(self, request):
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", param="messages")
        clean: List[Dict[str, str]] = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest("each message needs a string role and content", param="messages")
            content = m.get("content", "")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                    raise BadRequest("only text content parts are supported", param="messages")
                content = "".join(str(c.get("text", "")) for c in content)
            if not isinstance(content, str):
                raise BadRequest("message content must be a string", param="messages")
            clean.append({"role": m["role"], "content": content})
        prompt = self.engine.tokenizer.apply_chat_template(clean)
        params = sampling_from_body(body, 256)
        return await self._generate(request, body, prompt, params, chat=True)

    async def _generate(self, request, body, prompt, params: SamplingParams, chat: bool):
        try:
            prompt_ids = self.engine.check_request(prompt, params)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        t0 = time.monotonic()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        gen = self.engine.generate(prompt_ids, params, request_id=rid)
        self.metrics.tokens(prompt=len(prompt_ids))

        def usage(out):
            return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
                    "total_tokens": out.num_prompt_tokens + out.num_output_tokens}

        def chunk(choice, out=None, with_usage=False):
            d = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                 "model": self.model_name, "choices": [choice]}
            if with_usage:
                d["usage"] = usage(out)
            return d

        first = True
        if not stream:
            text, last = [], None
            try:
                async for out in gen:
                    if first:
                        self.metrics.first_token(time.monotonic() - t0)
                        first = False
                    self.metrics.tokens(generated=len(out.new_token_ids))
                    text.append(out.delta)
                    last = out
            except ValueError as e:
                raise BadRequest(str(e)) from None
            full = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": full},
                       "finish_reason": last.finish_reason} if chat else
                      {"index": 0, "text": full, "logprobs": None, "finish_reason": last.finish_reason})
            return web.json_response({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                      "choices": [choice], "usage": usage(last)})

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(d):
            await resp.write(b"data: " + json.dumps(d, ensure_ascii=False).encode() + b"\n\n")

        try:
            if chat:
                await send(chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None}))
            async for out in gen:
                if first:
                    self.metrics.first_token(time.monotonic() - t0)
                    first = False
                self.metrics.tokens(generated=len(out.new_token_ids))
                if out.delta or out.finished:
                    delta = {"content": out.delta} if chat else None
                    choice = ({"index": 0, "delta": delta, "finish_reason": out.finish_reason} if chat else
                              {"index": 0, "text": out.delta, "logprobs": None,
                               "finish_reason": out.finish_reason})
                    await send(chunk(choice))
                if out.finished and include_usage:
                    d = chunk({}, out, with_usage=True)
                    d["choices"] = []
                    await send(d)
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            await gen.aclose()  # the client went away: abort the request
            raise
        except Exception as e:  # headers are sent: report the error in-band
            await gen.aclose()
            await send({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        await resp.write_eof()
        return resp


# -- flags ------------------------------------------------------------------------------------------
def _bs_list(text: str) -> List[int]:
    try:
        sizes = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected batch sizes like '1 2 4 8' or '1,2,4,8'") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return sizes


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
    g.add_argument("--gpu-ids", type=_bs_list, default=None,
                   help="comma-separated GPU index per rank (default: rank r on GPU r); repeating an index puts "
                        "several ranks on one GPU (NCCL then runs over sockets; for tests)")
    g.add_argument("--disable-cuda-graph", action="store_true", help="decode eagerly on the GPU")
    g.add_argument("--random-seed", dest="seed", type=int, default=0,
                   help="seed of the builtin: random weights")
    g.add_argument("--served-model-name", default=None, help="model id reported by the API (default: --model)")
    g.add_argument("--foundry-archive", default=None,
                   help="directory of the per-rank Foundry archives of the decode graphs (saved or loaded there)")
    g.add_argument("--foundry-mode", default=None, choices=MODE_CHOICES, help=MODE_HELP)
    return parser


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    fields = EngineArgs.__dataclass_fields__
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in fields})


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m foundry_sglang.engine",
                                description="OpenAI-compatible server of the built-in Foundry engine "
                                            "(Qwen3 dense/MoE, TP/EP, paged KV, CUDA-graph decode).")
    add_engine_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=30000, help="port (0 picks a free one; default 30000)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging level")
    return p


# -- running ----------------------------------------------------------------------------------------
async def _start_site(engine: AsyncLLMEngine, host: str, port: int,
                      served_model_name: Optional[str]) -> Tuple[web.AppRunner, str]:
    runner = web.AppRunner(OpenAIServer(engine, served_model_name).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, f"http://{host}:{bound}"


class ServerThread:
    """Serve an AsyncLLMEngine from a background thread (tests, elastic workers): ``.url``, ``.stop()``."""

    def __init__(self, engine: AsyncLLMEngine, host: str = "127.0.0.1", port: int = 0,
                 served_model_name: Optional[str] = None):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.url = ""

        def run():
            asyncio.set_event_loop(self.loop)
            self._runner, self.url = self.loop.run_until_complete(
                _start_site(engine, host, port, served_model_name))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="engine-http", daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise RuntimeError("the HTTP server did not start")

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def serve(engine: AsyncLLMEngine, host: str, port: int, served_model_name: Optional[str] = None,
                startup_marks: Optional[Dict[str, float]] = None) -> None:
    """Serve until SIGINT/SIGTERM. ``startup_marks`` (phase -> wall-clock end) is logged once listening."""
    runner, url = await _start_site(engine, host, port, served_model_name)
    if startup_marks is not None:
        marks = dict(startup_marks, **engine.engine.runner.startup_marks, listening=time.time())
        log.info("startup timeline: %s", json.dumps(dict(sorted(marks.items(), key=lambda kv: kv[1]))))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("ready: serving %s at %s (OpenAI API under %s/v1)", engine.served_model_name, url, url)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()


def main(argv: Optional[List[str]] = None) -> int:
    marks = {"imported": time.time()}
    args = build_arg_parser().parse_args(argv)
    if os.environ.get(EXIT_WITH_PARENT_ENV) == "1":
        exit_with_parent()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        eargs = engine_args_from(args)
        eargs.validate()
        engine = AsyncLLMEngine(eargs)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    marks["engine"] = time.time()
    try:
        asyncio.run(serve(engine, args.host, args.port, args.served_model_name, marks))
    finally:
        engine.shutdown()
    return 0
