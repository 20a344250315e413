"""Ray Serve application: ``serve run launch/elastic_serve.yaml`` or ``foundry_sglang.elastic.serve:build_app``.

One Serve replica (the controller is a singleton) hosts an ``ElasticServer``: the controller with its Ray
backend and the router, listening on a private loopback port. The Serve deployment forwards every HTTP request
to it (streaming bodies pass through), so Serve's proxy, routes and autoscaling of the ingress stay standard
while workers are placed by the controller's own placement groups.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Dict, Optional

from .deployment import DeploymentConfig, ElasticServer

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def config_from_dict(args: Dict[str, Any]) -> DeploymentConfig:
    """DeploymentConfig from a Serve ``args`` mapping; unknown keys are one clear error."""
    known = {f.name for f in dataclasses.fields(DeploymentConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown elastic argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = DeploymentConfig(**args)
    cfg.backend = "ray"
    cfg.host, cfg.port = "127.0.0.1", 0   # private port; Serve's proxy is the public one
    return cfg


class ElasticIngress:
    """Serve deployment body: start the elastic server lazily on the replica's loop, forward requests."""

    def __init__(self, config: Dict[str, Any]):
        self.config = config_from_dict(config)
        self.server: Optional[ElasticServer] = None
        self._lock: Optional[asyncio.Lock] = None
        self._session = None

    async def _ensure_started(self) -> str:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.server is None:
                server = ElasticServer(self.config)
                await server.start()
                self.server = server
        return self.server.url

    async def check_health(self) -> None:
        await self._ensure_started()

    async def __call__(self, request):  # starlette Request -> starlette Response
        import aiohttp
        from starlette.responses import Response, StreamingResponse

        base = await self._ensure_started()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        upstream = await self._session.request(request.method, url, data=await request.body(), headers=headers)
        passthrough = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        if "event-stream" in (upstream.content_type or ""):
            async def body():
                try:
                    async for chunk in upstream.content.iter_any():
                        yield chunk
                finally:
                    upstream.release()
            return StreamingResponse(body(), status_code=upstream.status, headers=passthrough)
        data = await upstream.read()
        upstream.release()
        return Response(content=data, status_code=upstream.status, headers=passthrough)


def build_app(args: Dict[str, Any]):
    """Ray Serve application builder: ``args`` are DeploymentConfig fields (model, slots, tp, ep, ...)."""
    from ray import serve

    config_from_dict(dict(args))     # fail at build time on bad arguments
    deployment = serve.deployment(
        ElasticIngress, name="FoundryElastic", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4096, health_check_period_s=5, health_check_timeout_s=900)
    return deployment.bind(dict(args))
