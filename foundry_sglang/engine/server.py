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
import signal
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from aiohttp import web

from foundry_sglang import jsonsafe
from foundry_sglang.graphs.settings import FoundryMode
from foundry_sglang.proc import exit_with_parent_if_asked, port_problem

from .config import ConfigError, EngineArgs
from .engine import AsyncLLMEngine, EngineDead, RequestFailed
from .flags import ServerLimits, build_arg_parser, configure_logging, engine_args_from
from .graphs import GraphBackendFactory
from .metrics import Metrics
from .sampling import InvalidParam, SamplingParams

log = logging.getLogger("foundry_sglang.engine.server")


class BadRequest(Exception):
    """An error answer: one line, an HTTP status, the request field at fault (``param``)."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, retry_after: int = 0):
        super().__init__(message)
        self.status, self.param, self.retry_after = status, param, retry_after


def error_body(message: str, status: int, param: Optional[str] = None) -> Dict[str, Any]:
    """The OpenAI-style error object. ``scope`` tells a router whether the failure is this request's own
    (``request``: a bad request, or one that failed alone while the engine serves on) or the server's
    (``server``: 503, the engine is unavailable or busy), so a bad request never takes a replica out of routing."""
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "unavailable" if status == 503 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status,
                      "scope": "server" if status == 503 else "request"}}


def error_response(message: str, status: int, param: Optional[str] = None) -> web.Response:
    return web.json_response(error_body(message, status, param), status=status)


# -- request parsing --------------------------------------------------------------------------------
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

#: Fields we do not implement, with the values that mean "not used" (anything else is a 400, never ignored).
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "repetition_penalty": (None, 1), "min_p": (None, 0), "min_tokens": (None, 0),
    "response_format": (None, {"type": "text"}), "regex": (None,), "json_schema": (None,), "ebnf": (None,),
}


def parse_json_body(raw: bytes) -> Any:
    """The decoded JSON of a request body; BadRequest (400, one line) for anything that is not JSON."""
    try:
        return jsonsafe.loads(raw)
    except jsonsafe.MalformedJSON as e:
        raise BadRequest(f"malformed JSON body: {e}") from None


def _number(body: Dict, key: str, default, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}", param=key)
    return v


def _bool(body: Dict, key: str, param: Optional[str] = None) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"{key} must be a boolean (true or false), got {json.dumps(v)[:40]}", param=param or key)
    return v


def _reject_unsupported(body: Dict) -> None:
    for key, unused in UNSUPPORTED.items():
        if key in body and body[key] not in unused:
            raise BadRequest(f"{key} is not supported by this server", param=key)


def sampling_from_body(body: Dict, default_max_tokens: int) -> Tuple[SamplingParams, Optional[str]]:
    """The request's sampling parameters, and the key that set max_tokens (None: the default was used)."""
    _reject_unsupported(body)
    max_key = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    max_tokens = _number(body, max_key, default_max_tokens, int) if max_key else default_max_tokens
    if max_tokens < 1:
        raise BadRequest(f"{max_key} must be a positive integer", param=max_key)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings", param="stop")
    n = _number(body, "n", 1, int)
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise BadRequest("stop_token_ids must be a list of integers", param="stop_token_ids")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_number(body, "top_k", -1, int),
        seed=_number(body, "seed", None, int),
        stop=stop, stop_token_ids=stop_ids,
        ignore_eos=_bool(body, "ignore_eos"))
    try:
        params.validate()
    except InvalidParam as e:
        param = max_key if e.param == "max_tokens" and max_key else e.param
        raise BadRequest(str(e).replace("max_tokens", param or "max_tokens"), param=param) from None
    return params, max_key


def stream_settings(body: Dict) -> Tuple[bool, bool]:
    """(stream, include_usage), type-checked."""
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object such as {\"include_usage\": true}",
                         param="stream_options")
    return stream, _bool(opts, "include_usage", "stream_options.include_usage")


def chat_messages(messages: Any) -> List[Dict[str, str]]:
    """Checked chat messages as {role, content} with text content."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    clean: List[Dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest("each message must be an object with a role and content", param=f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise BadRequest(f"unknown role {json.dumps(role)[:40]}; expected one of {', '.join(CHAT_ROLES)}",
                             param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise BadRequest("only text content parts are supported", param=f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest("message content must be a string or a list of text parts",
                             param=f"messages[{i}].content")
        clean.append({"role": role, "content": content})
    return clean


class OpenAIServer:
    """HTTP handlers bound to one AsyncLLMEngine."""

    def __init__(self, engine: AsyncLLMEngine, served_model_name: Optional[str] = None,
                 limits: Optional[ServerLimits] = None):
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.model_name = served_model_name or engine.served_model_name
        self.aliases = {self.model_name, engine.engine.args.model}
        self.metrics = Metrics(engine.stats)
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=self.limits.max_body_bytes)
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
            if e.status == 503 and e.retry_after:
                resp.headers["Retry-After"] = str(e.retry_after)
        except web.HTTPException as e:
            resp = error_response(f"{e.reason}: {request.method} {request.path}", e.status)
        except ConnectionError:   # the client left (e.g. in the middle of its body): nobody to answer
            log.debug("client of %s %s disconnected", request.method, request.path)
            return web.Response(status=499)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one line to the client, the traceback to the log
            log.exception("request failed")
            resp = error_response(f"internal error: {type(e).__name__}: {e}", 500)
        if generation:
            self.metrics.request_done(resp.status)
        return resp

    async def _body(self, request: web.Request) -> Dict[str, Any]:
        try:
            raw = await asyncio.wait_for(request.read(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise BadRequest(f"the request body did not arrive within {self.limits.body_timeout:g}s",
                             status=408) from None
        body = parse_json_body(raw)
        if not isinstance(body, dict):
            raise BadRequest("the JSON body must be an object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest(f"model must be a string, got {json.dumps(model)[:40]}", param="model")
        if model is not None and model not in self.aliases:
            raise BadRequest(f"the model {str(model)[:200]!r} does not exist; this server serves "
                             f"{self.model_name!r}", status=404, param="model")
        return body

    # -- endpoints --------------------------------------------------------------------------------
    async def health(self, request):
        if self.engine.error is not None:
            return error_response(f"engine failed: {self.engine._error_line()}", 503)
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
        params, max_key = sampling_from_body(body, 16)
        return await self._generate(request, body, prompt, params, max_key, chat=False)

    async def chat_completions(self, request):
        body = await self._body(request)
        clean = chat_messages(body.get("messages"))
        params, max_key = sampling_from_body(body, 256)
        prompt = self.engine.tokenizer.apply_chat_template(clean)
        return await self._generate(request, body, prompt, params, max_key, chat=True)

    def _admit(self) -> None:
        """503 with Retry-After when the waiting queue is full."""
        eng = self.engine
        capacity = eng.engine.args.max_num_seqs
        waiting = eng.num_requests - capacity
        if waiting >= self.limits.max_queued_requests:
            retry = max(1, min(60, waiting // max(1, capacity)))
            raise BadRequest(f"the server is busy: {waiting} requests are waiting (queue limit "
                             f"{self.limits.max_queued_requests}); retry later", status=503,
                             retry_after=retry)
        if eng.error is not None:
            raise BadRequest(f"engine failed: {eng._error_line()}", status=503)

    async def _generate(self, request, body, prompt, params: SamplingParams, max_key: Optional[str], chat: bool):
        stream, include_usage = stream_settings(body)
        try:
            prompt_ids = self.engine.check_request(prompt, params)
        except InvalidParam as e:
            raise BadRequest(str(e), param=e.param) from None
        except ValueError as e:
            raise BadRequest(str(e), param="messages" if chat else "prompt") from None
        room = self.engine.max_model_len - len(prompt_ids)
        if params.max_tokens > room:
            if max_key:
                raise BadRequest(f"the prompt has {len(prompt_ids)} tokens and {max_key} is {params.max_tokens}, "
                                 f"more than the context length {self.engine.max_model_len}", param=max_key)
            params.max_tokens = room   # not asked for: the default is cut to what fits
        self._admit()
        t0 = time.monotonic()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
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
            # A client that disconnects cancels this handler (handler_cancellation): closing the generator
            # aborts the request in the engine.
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
            except RequestFailed as e:
                raise BadRequest(f"the request failed inside the engine: {e}", status=500) from None
            except EngineDead as e:
                raise BadRequest(str(e), status=503) from None
            finally:
                await gen.aclose()
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
        except ConnectionResetError:  # the client went away: abort its request, quietly
            await gen.aclose()
            log.debug("client of %s disconnected mid-stream", rid)
            return resp
        except asyncio.CancelledError:
            await gen.aclose()
            raise
        except Exception as e:  # headers are sent: report the error in-band
            await gen.aclose()
            try:
                await send(error_body(str(e).splitlines()[0] if str(e) else type(e).__name__,
                                      503 if isinstance(e, EngineDead) else 500))
            except ConnectionResetError:
                return resp
        try:
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp


# -- running ----------------------------------------------------------------------------------------
async def _start_site(engine: AsyncLLMEngine, host: str, port: int, served_model_name: Optional[str],
                      limits: Optional[ServerLimits] = None) -> Tuple[web.AppRunner, str]:
    limits = limits or ServerLimits()
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
    # keepalive_timeout: aiohttp closes a connection that has not sent complete headers within it.
    runner = web.AppRunner(OpenAIServer(engine, served_model_name, limits).app(), access_log=None,
                           handler_cancellation=True, keepalive_timeout=limits.header_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, f"http://{host}:{bound}"


class ServerThread:
    """Serve an AsyncLLMEngine from a background thread (tests, elastic workers): ``.url``, ``.stop()``."""

    def __init__(self, engine: AsyncLLMEngine, host: str = "127.0.0.1", port: int = 0,
                 served_model_name: Optional[str] = None, limits: Optional[ServerLimits] = None):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.url = ""

        def run():
            asyncio.set_event_loop(self.loop)
            self._runner, self.url = self.loop.run_until_complete(
                _start_site(engine, host, port, served_model_name, limits))
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
                startup_marks: Optional[Dict[str, float]] = None, limits: Optional[ServerLimits] = None) -> None:
    """Serve until SIGINT/SIGTERM. ``startup_marks`` (phase -> wall-clock end) is logged once listening."""
    runner, url = await _start_site(engine, host, port, served_model_name, limits)
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


def gpu_count_problem(eargs: EngineArgs, visible: int) -> Optional[str]:
    """Why ``visible`` GPUs cannot hold ``eargs``'s ranks (rank r on GPU ``gpu_of(r)``; ranks may share one),
    or None."""
    gpus = eargs.rank_gpus()
    need = max(gpus) + 1
    if need <= visible:
        return None
    where = f"--gpu-ids {','.join(map(str, gpus))}" if eargs.gpu_ids else \
        f"--tp/--ep put {eargs.world_size} ranks on GPUs 0..{eargs.world_size - 1} (--gpu-ids 0,0 shares one)"
    return f"{where}: needs {need} GPUs; {visible} visible"


def preflight(eargs: EngineArgs, host: str, port: int) -> None:
    """Check what would otherwise fail deep inside start-up (ConfigError, one line): a GPU asked for but absent,
    a port already taken. (An archive to load that does not exist is no error: LOAD falls back to live capture
    with one log line.)"""
    if eargs.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no usable CUDA GPU here (torch.cuda.is_available() is False); "
                              "use --device cpu")
        problem = gpu_count_problem(eargs, torch.cuda.device_count())
        if problem:
            raise ConfigError(problem)
    foundry = eargs.foundry
    if foundry.enabled and eargs.resolved_device() == "cpu":
        if foundry.mode in (FoundryMode.LOAD, FoundryMode.SAVE):
            log.warning("--foundry-mode %s: there are no CUDA graphs on CPU; the archive %s is not used",
                        foundry.mode, foundry.archive_dir)
    problem = port_problem(host, port) if port else None
    if problem:
        raise ConfigError(problem)


def main(argv: Optional[List[str]] = None, early=None,
         graph_backend_factory: Optional[GraphBackendFactory] = None,
         parsed: Optional[Tuple[argparse.Namespace, EngineArgs]] = None) -> int:
    """Run the server with ``argv`` (default: the command line). ``graph_backend_factory``: how every rank makes
    its decode graphs (default: live capture; ``python -m foundry_sglang.engine`` passes Foundry's). ``early``: a
    ``foundry_core.EarlyLoad`` started for these arguments before the engine was imported; its times join the
    startup timeline, and it is discarded if the graph backend did not adopt it. ``parsed``: ``argv`` already
    parsed into flags and EngineArgs (by whoever started the early load), so they are not parsed again."""
    marks = {"imported": time.time()}
    args, eargs = parsed if parsed is not None else (build_arg_parser().parse_args(argv), None)
    exit_with_parent_if_asked()
    configure_logging(args.log_level)
    if args.standby:
        from .standby import run_standby
        return run_standby(args.device, gpu=(args.gpu_ids or [0])[0],
                           serve=lambda argv: main(argv, graph_backend_factory=graph_backend_factory))
    limits = ServerLimits(max_queued_requests=args.max_queued_requests, header_timeout=args.header_timeout,
                          body_timeout=args.body_timeout)
    try:
        if args.max_queued_requests < 0 or args.header_timeout <= 0 or args.body_timeout <= 0:
            raise ConfigError("--max-queued-requests must be >= 0 and --header-timeout/--body-timeout > 0")
        eargs = eargs if eargs is not None else engine_args_from(args)
        eargs.validate()
        preflight(eargs, args.host, args.port)
        engine = AsyncLLMEngine(eargs, graph_backend_factory=graph_backend_factory)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    except Exception as e:  # one line for the user; the traceback at debug level
        log.error("cannot start the engine: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        log.debug("start-up failure", exc_info=True)
        return 1
    marks["engine"] = time.time()
    if early is not None:
        marks.update(early.timeline())
        early.discard()  # nothing when the graph backend adopted it
    try:
        asyncio.run(serve(engine, args.host, args.port, args.served_model_name, marks, limits))
    except OSError as e:  # the port was taken between the check and the bind
        log.error("cannot listen on %s:%d: %s", args.host, args.port, e.strerror or e)
        return 2
    finally:
        engine.shutdown()
    return 0
