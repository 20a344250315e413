"""HTTP surface of an elastic deployment: inference routes, health, metrics and the reconfiguration API.

Everything is served on one port (127.0.0.1 by default):

=================================  ===========================================================================
``POST /v1/completions``           proxied to the active generation (``"stream": true`` passes SSE through)
``POST /v1/chat/completions``      same
``GET /v1/models``                 the served model
``GET /health``                    200 ``{"status": "ok" | "degraded" | "reconfiguring" | ...}``; 503 unavailable
``GET /metrics``                   Prometheus text
``POST /reconfigure``              body ``{"tp": 2, "ep": 1, "replicas": 1}`` → 202 ``{"id": ..., ...}``
``GET /reconfigure/{id}``          the job: state, phase, strategy, time per phase
``GET /status``                    generations, replicas, router counters, current job
=================================  ===========================================================================

When an API token is set, ``/reconfigure`` and ``/status`` need ``Authorization: Bearer TOKEN`` (401 without,
403 with a wrong one). Inference, health and metrics stay open.
"""
from __future__ import annotations

import hmac
import logging
from typing import Optional

from aiohttp import web

from . import metrics
from .controller import Controller, ControllerBusy
from .layout import LayoutError
from .router import PROXIED_PATHS, Router, json_error

log = logging.getLogger("foundry_sglang.elastic.api")

CONTROLLER = web.AppKey("controller", Controller)
ROUTER = web.AppKey("router", Router)


@web.middleware
async def _errors(request: web.Request, handler):
    """Every error leaves as one JSON line; never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return json_error(exc.status, exc.reason if exc.status in (404, 405) else (exc.text or exc.reason))
    except ConnectionError:   # the client left (e.g. in the middle of its body): nobody to answer
        log.debug("client of %s disconnected", request.path)
        return web.Response(status=499)
    except Exception as exc:  # reported, not leaked
        log.exception("unhandled error on %s", request.path)
        return json_error(500, f"internal error: {type(exc).__name__}", "internal_error")


def _auth(request: web.Request, token: Optional[str]) -> Optional[web.Response]:
    if not token:
        return None
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():   # the scheme is case-insensitive (RFC 9110)
        return json_error(401, "missing bearer token: send 'Authorization: Bearer <token>'", "auth_error")
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        return json_error(403, "wrong bearer token", "auth_error")
    return None


def build_app(controller: Controller, router: Router, api_token: Optional[str] = None) -> web.Application:
    """The aiohttp application serving one deployment."""
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[CONTROLLER] = controller
    app[ROUTER] = router

    async def health(request: web.Request) -> web.Response:
        health = await controller.health()
        return web.json_response(health, status=health.pop("code"))

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(text=metrics.render(router, controller), content_type="text/plain",
                            headers={"X-Content-Type": "text/plain; version=0.0.4"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": controller.config.model, "object": "model", "owned_by": "foundry"}]})

    async def reconfigure(request: web.Request) -> web.Response:
        denied = _auth(request, api_token)
        if denied:
            return denied
        try:
            job = controller.submit(await request.read())
        except LayoutError as exc:
            return json_error(400, str(exc))
        except ControllerBusy as exc:
            return json_error(409, str(exc), "conflict")
        return web.json_response(job.describe(), status=202)

    async def job_status(request: web.Request) -> web.Response:
        denied = _auth(request, api_token)
        if denied:
            return denied
        job = controller.jobs.get(request.match_info["job_id"])
        if job is None:
            return json_error(404, f"no reconfiguration with id {request.match_info['job_id']!r}", "not_found")
        return web.json_response(job.describe())

    async def status(request: web.Request) -> web.Response:
        denied = _auth(request, api_token)
        return denied or web.json_response(controller.status())

    for path in PROXIED_PATHS:
        app.router.add_post(path, router.handle_proxy)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_post("/reconfigure", reconfigure)
    app.router.add_get("/reconfigure/{job_id}", job_status)
    app.router.add_get("/status", status)
    return app
