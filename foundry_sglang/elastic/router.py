"""The request router: OpenAI-compatible proxy in front of the active generation.

The router holds one *route set* (the active generation's replicas). Switching generations is replacing that
object, which on one asyncio loop is atomic. Every request is counted on the upstream that serves it, so the
controller can wait until an old generation is idle before stopping it. While no generation is routable (the
gap of a reconfiguration that cannot overlap old and new), requests wait in a bounded queue; only a gap longer
than ``queue_timeout`` turns into a 503 with a clear message.

A request's own failure is told from a replica's: a 4xx, or a 500 (or an in-band stream error) whose error
object the engine marks ``"scope": "request"``, goes to the client as it is, is never retried and never counts
against the replica, so bad requests cannot take replicas out of routing. A request is retried on another
replica only when nothing was sent to the client yet (connection refused, upstream gone before its response
finished, or a 502/503/504). Another 500 and a "busy" 503 (one with Retry-After) are tried once more on a
replica that has not answered this request yet; when all have, the client gets that answer. A greedy
streaming request (temperature 0) is also resumed after a mid-stream loss: it is re-run elsewhere and the
events already delivered are skipped, after checking that the re-run repeats them (otherwise the stream ends
with an error event rather than splice two different answers). A stream that has delivered ``[DONE]`` is
finished: whatever its upstream does afterwards is ignored. An upstream that fails several requests in a row
is routed around for a while even before the controller's health check replaces it. A client that
disconnects is never the upstream's fault: its request is dropped (the upstream connection closes, which
aborts it there) and nothing is retried.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import aiohttp
from aiohttp import web

from foundry_sglang import jsonsafe

log = logging.getLogger("foundry_sglang.elastic.router")

RETRYABLE_STATUS = (502, 503, 504)
#: Response header naming the replica that answered (a resumed stream: the first one).
REPLICA_HEADER = "X-Foundry-Replica"
PROXIED_PATHS = ("/v1/completions", "/v1/chat/completions")
#: Consecutive failed answers (5xx or a lost connection) after which an upstream is routed around for a while.
FAILURES_BEFORE_DOWN = 3


class _UpstreamLost(Exception):
    """The upstream failed before the request completed."""


class _ClientGone(Exception):
    """The client disconnected; nothing to retry, nobody to blame."""


class _Diverged(Exception):
    """A resumed stream does not repeat what the client already received: it cannot continue exactly."""


async def _to_client(out: web.StreamResponse, data: Optional[bytes] = None) -> None:
    """Write (or end, with None) a response to the client; _ClientGone if it is no longer there."""
    try:
        if data is None:
            await out.write_eof()
        else:
            await out.write(data)
    except (ConnectionError, RuntimeError) as exc:   # reset, or "cannot write to closing transport"
        raise _ClientGone() from exc


def _busy(r: aiohttp.ClientResponse) -> bool:
    """A replica shedding load (503 with Retry-After), as opposed to one that is down."""
    return r.status == 503 and "Retry-After" in r.headers


def _error_of(payload: bytes) -> Optional[Dict[str, Any]]:
    """The ``error`` object of a JSON error body (or of an SSE event's data); None when it has none."""
    try:
        doc = jsonsafe.loads(payload)
    except jsonsafe.MalformedJSON:
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else None


def _request_failure(status: int, data: bytes) -> bool:
    """A 4xx, or a 500 the engine marked as this request's own failure (its replica serves on)."""
    if 400 <= status < 500:
        return True
    return status == 500 and (_error_of(data) or {}).get("scope") == "request"


def _event_error(event: bytes) -> Optional[Dict[str, Any]]:
    """The error object of an in-band SSE error event (``data: {"error": ...}``), else None."""
    payload = event[5:].lstrip() if event.startswith(b"data:") else b""
    return _error_of(payload) if payload.startswith(b'{"error"') else None


def _content(event: bytes) -> bytes:
    """What a greedy re-run must repeat of an event: its choices and usage (not its id or timestamp)."""
    if event.startswith(b"data:"):
        try:
            doc = jsonsafe.loads(event[5:])
        except jsonsafe.MalformedJSON:
            return event
        if isinstance(doc, dict):
            return json.dumps([doc.get("choices"), doc.get("usage")], sort_keys=True).encode()
    return event


def _answer(r: aiohttp.ClientResponse, data: bytes) -> web.Response:
    headers = {"Retry-After": r.headers["Retry-After"]} if "Retry-After" in r.headers else None
    return web.Response(body=data, status=r.status, content_type=r.content_type or "application/json",
                        headers=headers)


@dataclass(eq=False)
class Upstream:
    """One replica's server as the router sees it."""

    url: str
    generation: int
    outstanding: int = 0
    down_until: float = 0.0
    served: int = 0
    failures: int = 0            # consecutive failed answers

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    @property
    def name(self) -> str:
        """What the ``X-Foundry-Replica`` response header says: generation and port (``3:41234``)."""
        return f"{self.generation}:{self.url.rsplit(':', 1)[-1]}"


@dataclass
class RouteSet:
    generation: int
    upstreams: List[Upstream] = field(default_factory=list)


def json_error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    """OpenAI-style error body with one clear line."""
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class RouterStats:
    def __init__(self) -> None:
        self.requests = 0
        self.completed = 0
        self.failed = 0
        self.retries = 0
        self.resumed = 0
        self.queued_total = 0
        self.queued_now = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.recent_latency: List[float] = []  # bounded window for the policy hook

    def observe_latency(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
        self.recent_latency.append(seconds)
        del self.recent_latency[:-256]


class Router:
    """Routes to the active route set; queues while there is none."""

    def __init__(self, queue_limit: int = 1024, queue_timeout: float = 300.0, max_attempts: int = 20,
                 request_timeout: float = 600.0, down_seconds: float = 2.0, body_timeout: float = 30.0):
        self.body_timeout = body_timeout
        self.queue_limit = queue_limit
        self.queue_timeout = queue_timeout
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.down_seconds = down_seconds
        self.active: Optional[RouteSet] = None
        self.stats = RouterStats()
        self._changed = asyncio.Event()      # set whenever routing or an upstream's count changes
        self._rr = itertools.count()
        self._session: Optional[aiohttp.ClientSession] = None
        self._tracked: Dict[int, Upstream] = {}

    # -- routing table (called by the controller) ----------------------------------------------
    def set_active(self, route_set: Optional[RouteSet]) -> None:
        """Route new requests to ``route_set`` (None: queue them). In-flight requests are not touched."""
        self.active = route_set
        for up in route_set.upstreams if route_set else ():
            self._tracked[id(up)] = up
        self._notify()

    def remove_upstreams(self, upstreams: Sequence[Upstream]) -> None:
        """Stop routing to ``upstreams`` (a shrink); the rest of the active set keeps serving."""
        if self.active:
            gone = {id(u) for u in upstreams}
            self.active = RouteSet(self.active.generation, [u for u in self.active.upstreams if id(u) not in gone])
        self._notify()

    def outstanding(self, upstreams: Sequence[Upstream]) -> int:
        return sum(u.outstanding for u in upstreams)

    async def wait_idle(self, upstreams: Sequence[Upstream], timeout: float) -> bool:
        """Wait until no request is in flight on ``upstreams``; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outstanding(upstreams):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True

    def inflight_by_generation(self) -> Dict[int, int]:
        out: Dict[int, int] = {}
        for up in self._tracked.values():
            out[up.generation] = out.get(up.generation, 0) + up.outstanding
        return out

    def forget_generation(self, generation: int) -> None:
        self._tracked = {k: u for k, u in self._tracked.items() if u.generation != generation or u.outstanding}

    def _notify(self) -> None:
        self._changed.set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=5),
                connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def routable(self) -> int:
        """Upstreams of the active route set that take requests now."""
        return sum(u.available for u in self.active.upstreams) if self.active else 0

    # -- picking an upstream ---------------------------------------------------------------------
    def _choose(self, tried: Sequence[Upstream] = ()) -> Optional[Upstream]:
        """The least busy available upstream, preferring those not ``tried`` for this request yet."""
        route = self.active
        if route is None:
            return None
        ready = [u for u in route.upstreams if u.available]
        if not ready:
            return None
        fresh = [u for u in ready if all(u is not t for t in tried)]
        ready = fresh or ready
        low = min(u.outstanding for u in ready)
        least = [u for u in ready if u.outstanding == low]
        return least[next(self._rr) % len(least)]

    def _untried(self, tried: Sequence[Upstream]) -> bool:
        route = self.active
        return bool(route) and any(u.available and all(u is not t for t in tried) for u in route.upstreams)

    async def _acquire(self, deadline: float, tried: Sequence[Upstream] = ()) -> Upstream:
        """An upstream with its outstanding count taken, waiting (queued) while none is routable."""
        up = self._choose(tried)
        if up is None:
            if self.stats.queued_now >= self.queue_limit:
                raise web.HTTPServiceUnavailable(
                    text=_error_text(f"request queue is full ({self.queue_limit} waiting during a reconfiguration)"),
                    content_type="application/json")
            self.stats.queued_total += 1
            self.stats.queued_now += 1
            try:
                while up is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise web.HTTPServiceUnavailable(
                            text=_error_text(f"no serving generation became available within "
                                             f"{self.queue_timeout:.0f}s (reconfiguration gap); retry later"),
                            content_type="application/json")
                    self._changed.clear()
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.25))
                    except asyncio.TimeoutError:
                        pass
                    up = self._choose(tried)
            finally:
                self.stats.queued_now -= 1
        up.outstanding += 1
        return up

    def _release(self, up: Upstream) -> None:
        up.outstanding -= 1
        self._notify()

    def _mark_down(self, up: Upstream) -> None:
        up.failures += 1
        up.down_until = time.monotonic() + self.down_seconds

    def _answered(self, up: Upstream, ok: bool) -> None:
        """Passive health: FAILURES_BEFORE_DOWN failed answers in a row take ``up`` out for a while."""
        if ok:
            up.failures = 0
            return
        up.failures += 1
        if up.failures >= FAILURES_BEFORE_DOWN:
            log.warning("upstream %s failed %d requests in a row; routing around it for %.0fs",
                        up.url, up.failures, self.down_seconds)
            up.down_until = time.monotonic() + self.down_seconds

    # -- HTTP handlers ---------------------------------------------------------------------------
    async def handle_proxy(self, request: web.Request) -> web.StreamResponse:
        try:
            raw = await asyncio.wait_for(request.read(), self.body_timeout)
        except asyncio.TimeoutError:
            return json_error(408, f"the request body did not arrive within {self.body_timeout:g}s")
        try:
            body = jsonsafe.loads(raw)
        except jsonsafe.MalformedJSON as exc:
            return json_error(400, f"malformed JSON body: {exc}")
        if not isinstance(body, dict):
            return json_error(400, "request body must be a JSON object")
        self.stats.requests += 1
        started = time.monotonic()
        try:
            if body.get("stream") is True:
                resp = await self._proxy_stream(request, raw, _is_greedy(body))
            else:
                resp = await self._proxy_unary(request.path, raw)
        except web.HTTPServiceUnavailable:
            self.stats.failed += 1
            raise
        except _ClientGone:
            log.debug("client of %s left before its answer was complete", request.path)
            return web.Response(status=499)   # nobody reads this; aiohttp needs a response object
        if resp.status < 500 and not getattr(resp, "failed_mid_stream", False):
            self.stats.completed += 1
            self.stats.observe_latency(time.monotonic() - started)
        else:
            self.stats.failed += 1
        return resp

    async def _proxy_unary(self, path: str, raw: bytes) -> web.Response:
        deadline = time.monotonic() + self.queue_timeout
        last = "no attempt made"
        tried: List[Upstream] = []
        for attempt in range(self.max_attempts):
            up = await self._acquire(deadline, tried)
            tried.append(up)
            try:
                session = await self.session()
                async with session.post(up.url + path, data=raw,
                                        headers={"Content-Type": "application/json"}) as r:
                    data = await r.read()
                    if r.status in RETRYABLE_STATUS and not _busy(r):
                        raise _UpstreamLost(f"{up.url} answered {r.status}")
                    if _request_failure(r.status, data):
                        return _answer(r, data)      # the request's own failure: not retried, not the replica's
                    self._answered(up, r.status < 500 or _busy(r))
                    if (r.status == 500 or _busy(r)) and self._untried(tried):
                        self.stats.retries += 1
                        log.info("%s answered %d to %s; trying another replica", up.url, r.status, path)
                        continue
                    up.served += 1
                    resp = _answer(r, data)
                    resp.headers[REPLICA_HEADER] = up.name
                    return resp
            except (aiohttp.ClientError, asyncio.TimeoutError, _UpstreamLost, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._mark_down(up)
                self.stats.retries += 1
                log.info("retrying %s after upstream %s failed (%s)", path, up.url, last)
            finally:
                self._release(up)
        return json_error(502, f"all {self.max_attempts} attempts failed; last: {last}", "upstream_error")

    async def _proxy_stream(self, request: web.Request, raw: bytes, greedy: bool) -> web.StreamResponse:
        path = request.path
        deadline = time.monotonic() + self.queue_timeout
        out: Optional[web.StreamResponse] = None
        delivered: List[bytes] = []   # the content (_content) of every SSE event written to the client
        last = "no attempt made"
        tried: List[Upstream] = []
        for attempt in range(self.max_attempts):
            try:
                up = await self._acquire(deadline, tried)
            except web.HTTPServiceUnavailable as exc:
                if out is None:
                    raise
                last = f"resume not possible: {exc.text}"
                break
            tried.append(up)
            resume_from = len(delivered)   # events this run must repeat before it adds to the stream
            replayed = 0
            try:
                session = await self.session()
                async with session.post(up.url + path, data=raw,
                                        headers={"Content-Type": "application/json"}) as r:
                    if r.status in RETRYABLE_STATUS and not _busy(r):
                        await r.read()
                        raise _UpstreamLost(f"{up.url} answered {r.status}")
                    if r.status != 200 or "event-stream" not in (r.content_type or ""):
                        if out is not None:   # an error after partial output cannot be shown as a status
                            raise _UpstreamLost(f"{up.url} answered {r.status} on resume")
                        data = await r.read()
                        if _request_failure(r.status, data):
                            return _answer(r, data)
                        self._answered(up, r.status < 500 or _busy(r))
                        if (r.status == 500 or _busy(r)) and self._untried(tried):
                            self.stats.retries += 1
                            continue
                        return _answer(r, data)
                    if out is None:
                        out = web.StreamResponse(status=200, headers={
                            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", REPLICA_HEADER: up.name})
                        try:
                            await out.prepare(request)
                        except (ConnectionError, RuntimeError) as exc:
                            raise _ClientGone() from exc
                    buf = b""
                    async for chunk in r.content.iter_any():
                        buf += chunk
                        while b"\n\n" in buf:
                            event, buf = buf.split(b"\n\n", 1)
                            error = _event_error(event)
                            if error is not None and error.get("scope") != "request":
                                raise _UpstreamLost(f"{up.url} failed mid-stream: {str(error.get('message'))[:200]}")
                            if error is None and replayed < resume_from:   # a resumed run: already sent
                                if _content(event) != delivered[replayed]:
                                    raise _Diverged(f"the re-run on {up.url} differs from what was delivered")
                                replayed += 1
                                continue
                            await _to_client(out, event + b"\n\n")
                            if error is not None:   # the request's own failure ends its stream; nobody to blame
                                out.failed_mid_stream = True   # type: ignore[attr-defined]
                                await _to_client(out)
                                return out
                            delivered.append(_content(event) if greedy else b"")
                            if event.strip() == b"data: [DONE]":   # finished: what the upstream does next is moot
                                up.served += 1
                                self._answered(up, True)
                                await _to_client(out)
                                return out
                    raise _UpstreamLost(f"{up.url} closed the stream before [DONE]")
            except _Diverged as exc:
                last = f"resume not possible: {exc}"
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, _UpstreamLost, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._mark_down(up)
                if out is not None and not greedy:
                    break        # partial sampled output cannot be resumed exactly
                self.stats.retries += 1
                if out is not None:
                    self.stats.resumed += 1
                log.info("retrying stream %s after upstream %s failed (%s); %d events delivered",
                         path, up.url, last, len(delivered))
            finally:
                self._release(up)
        if out is None:
            return json_error(502, f"all attempts failed; last: {last}", "upstream_error")
        out.failed_mid_stream = True   # type: ignore[attr-defined]  # counted as failed by handle_proxy
        msg = json.dumps({"error": {"message": f"upstream lost mid-stream: {last}", "type": "upstream_error"}})
        try:
            await _to_client(out, f"data: {msg}\n\n".encode())
            await _to_client(out)
        except _ClientGone:
            pass
        return out


def _error_text(message: str) -> str:
    return json.dumps({"error": {"message": message, "type": "unavailable", "code": 503}})


def _is_greedy(body: Dict[str, Any]) -> bool:
    t = body.get("temperature")
    return (isinstance(t, (int, float)) and t == 0) or body.get("top_k") == 1
