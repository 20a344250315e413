"""Running an elastic deployment: the server object, its Ray actor, and the Python API.

``ElasticServer`` puts the controller, the router and the HTTP app on one asyncio loop. With Ray it lives
inside ``ControllerActor`` (an async Ray actor; workers are further actors in placement groups); without Ray
it runs on a background thread of the calling process and starts workers as local processes.
``ElasticDeployment`` is the synchronous Python API over either.

Recovery (Ray): the controller actor is restarted by Ray when it crashes (``max_restarts``). Its workers and
placement groups die with it, so the restarted actor starts over, but from what it persisted in Ray's key-value
store at every finished job: the layout it served and its port. ``ElasticDeployment.supervise()`` (which the
launcher calls every few seconds) starts the restarted actor's service again, and reports a controller that is
gone for good.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from aiohttp import web

from foundry_sglang.graphs.settings import FoundryConfig

from .api import build_app
from .backends import LocalBackend, RayBackend
from .controller import Controller, ControllerBusy, ControllerConfig
from .layout import Layout, LayoutError, resolve_model_shape
from .policy import LoadPolicy, PolicyConfig
from .router import Router

log = logging.getLogger("foundry_sglang.elastic.deployment")

#: How long stop() waits for the controller to stop its generations.
STOP_TIMEOUT_S = 30.0
#: Ray restarts of a crashed controller actor (-1: always, as Ray Serve does for its own controller).
CONTROLLER_MAX_RESTARTS = -1
KV_NAMESPACE = "foundry_elastic"


class ControllerLost(RuntimeError):
    """The controller actor is gone for good (its restarts are used up, or Ray itself is gone)."""
#: Seconds a client connection has to send complete request headers (and the idle keep-alive time).
HEADER_TIMEOUT_S = 30.0
#: How long a restarted controller keeps trying to take back its predecessor's port.
REBIND_TIMEOUT_S = 60.0


@dataclass
class DeploymentConfig:
    """All knobs of one deployment (what ``--help`` of the elastic launcher lists)."""

    model: str = "builtin:tiny"
    slots: int = 1
    tp: int = 1
    ep: int = 1
    replicas: int = 1
    kind: str = "builtin"
    device: str = "cpu"
    gpu_ids: Optional[List[int]] = None      # local backend on GPU: each slot's GPU (default 0..slots-1)
    slots_per_gpu: int = 1                   # >1: that many slots share each GPU (ranks/replicas on one GPU)
    host: str = "127.0.0.1"
    port: int = 8000
    api_token: Optional[str] = None
    backend: str = "ray"                     # ray | local
    foundry: FoundryConfig = field(default_factory=FoundryConfig)  # archive_dir: one subdirectory per layout
    extra_args: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)   # extra environment of every engine process
    log_dir: Optional[str] = None
    queue_limit: int = 1024
    queue_timeout: float = 300.0
    start_timeout: float = 600.0
    drain_timeout: float = 600.0
    policy: Optional[Dict[str, Any]] = None  # PolicyConfig fields; None: policy off
    standby: int = 0                         # warm standby workers kept on free slots
    standby_coreside: bool = False           # standbys may also wait on serving slots (LocalBackend coreside)

    def __post_init__(self) -> None:
        if isinstance(self.foundry, Mapping):  # from YAML (Ray Serve args) or asdict() (the controller actor)
            self.foundry = FoundryConfig.from_dict(self.foundry)
        if self.slots_per_gpu < 1:
            raise ValueError("slots_per_gpu must be >= 1")
        if self.standby < 0:
            raise ValueError("standby must be >= 0")
        if self.standby_coreside and (not self.standby or self.backend != "local"):
            raise ValueError("standby_coreside needs standby >= 1 and backend 'local'")

    def controller_config(self) -> ControllerConfig:
        return ControllerConfig(model=self.model, slots=self.slots, layout=Layout(self.tp, self.ep, self.replicas),
                                kind=self.kind, device=self.device, foundry=self.foundry,
                                extra_args=list(self.extra_args),
                                env=dict(self.env), log_dir=self.log_dir, start_timeout=self.start_timeout,
                                drain_timeout=self.drain_timeout, standby=self.standby)


class ElasticServer:
    """Controller + router + HTTP app on the current event loop."""

    def __init__(self, config: DeploymentConfig, instance: str = ""):
        """``instance`` names this deployment's Ray resources (so a restarted controller finds its leftovers)."""
        self.config = config
        self.router = Router(queue_limit=config.queue_limit, queue_timeout=config.queue_timeout)
        if config.backend == "ray":
            backend: Any = RayBackend(device=config.device, instance=instance, slots_per_gpu=config.slots_per_gpu,
                                      standby=config.standby, slots=config.slots)
        elif config.backend == "local":
            slots = config.gpu_ids or [i // config.slots_per_gpu for i in range(config.slots)]
            backend = LocalBackend(slots[:config.slots], standby=config.standby, coreside=config.standby_coreside)
        else:
            raise ValueError(f"unknown backend {config.backend!r}; expected ray or local")
        # An SGLang model may be a hub name with no local config.json: then only the slot count is checked.
        remote_sglang = config.kind == "sglang" and not config.model.startswith("builtin:") \
            and not _has_config(config.model)
        shape = None if remote_sglang else resolve_model_shape(config.model)
        self.controller = Controller(config.controller_config(), backend, self.router, shape)
        self.policy: Optional[LoadPolicy] = None
        self.recovered = False    # True in a controller Ray restarted after a crash
        self._runner: Optional[web.AppRunner] = None
        self.url: Optional[str] = None

    async def start(self) -> str:
        """Bring up the first generation, then open the port; returns the base URL. A controller Ray restarted
        opens its port first: its clients' requests then wait in the router's queue while the generation comes
        back, instead of being refused."""
        app = build_app(self.controller, self.router, self.config.api_token)
        # handler_cancellation: a client that disconnects cancels its proxied request (and so the upstream's);
        # keepalive_timeout: connections that do not send complete headers in time are closed.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     keepalive_timeout=HEADER_TIMEOUT_S)
        await self._runner.setup()
        try:
            if self.recovered:
                await self._listen()
                await self.controller.start()
            else:
                await self.controller.start()
                await self._listen()
        except BaseException:
            await self.controller.stop()
            await self._runner.cleanup()
            raise
        port = self._runner.addresses[0][1]
        self.url = f"http://{self.config.host}:{port}"
        if self.config.policy:
            self.policy = LoadPolicy(self.controller, self.router, PolicyConfig(**self.config.policy))
            self.policy.start()
        log.info("elastic deployment of %s serving on %s (%s)", self.config.model, self.url,
                 self.controller.active.layout if self.controller.active else "-")
        return self.url

    async def _listen(self) -> None:
        """Open the router's port. A restarted controller takes back its predecessor's port, which may stay busy
        for a moment while the old process goes away: retry for up to REBIND_TIMEOUT_S."""
        deadline = time.monotonic() + (REBIND_TIMEOUT_S if self.recovered else 0.0)
        while True:
            try:
                await web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True).start()
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        if self.policy:
            self.policy.stop()
        await self.controller.stop()
        if self._runner:
            await self._runner.cleanup()
        await self.router.close()

    # Helpers the Ray actor and the thread runner share.
    def submit(self, body: Dict[str, Any]) -> Dict[str, Any]:
        return self.controller.submit(body).describe()

    def job(self, job_id: str) -> Optional[Dict[str, Any]]:
        job = self.controller.jobs.get(job_id)
        return job.describe() if job else None

    def status(self) -> Dict[str, Any]:
        return dict(self.controller.status(), recovered=self.recovered)


def exposure_warning(host: str, api_token: Optional[str]) -> Optional[str]:
    """The warning for an admin API open beyond this machine (a non-loopback ``host`` and no token), else None."""
    if api_token:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    return (f"the router listens on {host} with no API token: anyone who can reach this port can reconfigure "
            "and stop the deployment (/reconfigure). Set --api-token (or $FOUNDRY_ELASTIC_API_TOKEN), or "
            "bind 127.0.0.1")


def _has_config(model: str) -> bool:
    return os.path.isfile(os.path.join(model, "config.json"))


_actor_cls = None


def controller_actor():
    """The Ray actor class hosting an ElasticServer (defined lazily: importing ray is slow)."""
    global _actor_cls
    if _actor_cls is None:
        import ray

        @ray.remote(num_cpus=0)
        class ControllerActor:
            def __init__(self, config: Dict[str, Any], state_key: str):
                logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
                self.state_key = state_key.encode()
                cfg = DeploymentConfig(**config)
                saved = self._saved()
                if saved:   # restarted after a crash: serve what we served, where we served it
                    cfg.tp, cfg.ep, cfg.replicas, cfg.port = saved["tp"], saved["ep"], saved["replicas"], saved["port"]
                    log.warning("elastic: controller restarted; resuming %s on port %d",
                                Layout(cfg.tp, cfg.ep, cfg.replicas), cfg.port)
                self.server = ElasticServer(cfg, instance=state_key)
                self.server.recovered = bool(saved)
                self._starting: Optional[asyncio.Future] = None
                self.server.controller.on_layout = self._save
                if saved:
                    self.server.controller.backend.remove_stale_groups()

            def _saved(self) -> Optional[Dict[str, int]]:
                from ray.experimental import internal_kv
                raw = internal_kv._internal_kv_get(self.state_key, namespace=KV_NAMESPACE)
                return json.loads(raw) if raw else None

            def _save(self, layout: Layout) -> None:
                from ray.experimental import internal_kv
                port = int(self.server.url.rsplit(":", 1)[1]) if self.server.url else self.server.config.port
                state = {"tp": layout.tp, "ep": layout.ep, "replicas": layout.replicas, "port": port}
                internal_kv._internal_kv_put(self.state_key, json.dumps(state).encode(), overwrite=True,
                                             namespace=KV_NAMESPACE)

            async def start(self) -> str:
                """Start the service once: every caller (the first start, a supervisor polling a restarted
                actor again after its time-out) awaits the same start; after a failed one the next call retries."""
                if self._starting is None or (self._starting.done() and self.server.url is None):  # none, failed
                    self._starting = asyncio.ensure_future(self._start())
                return await asyncio.shield(self._starting)

            async def _start(self) -> str:
                url = await self.server.start()
                if self.server.controller.active is not None:
                    self._save(self.server.controller.active.layout)
                return url

            async def ensure_started(self) -> str:
                """The URL; starts the service first when this is a restarted actor."""
                return self.server.url or await self.start()

            async def stop(self) -> None:
                await self.server.stop()
                from ray.experimental import internal_kv
                internal_kv._internal_kv_del(self.state_key, namespace=KV_NAMESPACE)

            async def submit(self, body: Dict[str, Any]) -> Dict[str, Any]:
                return self.server.submit(body)

            async def job(self, job_id: str) -> Optional[Dict[str, Any]]:
                return self.server.job(job_id)

            async def status(self) -> Dict[str, Any]:
                return self.server.status()

        _actor_cls = ControllerActor
    return _actor_cls


class ElasticDeployment:
    """Synchronous Python API: ``start()``, ``reconfigure(tp=..)``, ``status()``, ``stop()``.

    With ``backend="ray"`` the controller is a Ray actor (``ray.init`` must have run, or it is called with
    defaults); with ``backend="local"`` it runs on a thread of this process. Errors raised by ``reconfigure``
    are ``LayoutError`` (invalid) and ``ControllerBusy`` (another one running), as over HTTP.
    """

    def __init__(self, config: Optional[DeploymentConfig] = None, **overrides: Any):
        self.config = config or DeploymentConfig()
        for k, v in overrides.items():
            setattr(self.config, k, v)
        self.url: Optional[str] = None
        self._actor = None
        self._server: Optional[ElasticServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    # -- plumbing --------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> Any:
        if self._actor is not None:
            import ray
            try:
                return ray.get(getattr(self._actor, method).remote(*args))
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, (LayoutError, ControllerBusy)):
                    raise err.cause from None   # the one-line error, as the local backend and HTTP give it
                raise
        assert self._loop is not None and self._server is not None, "start() the deployment first"

        async def run():
            result = getattr(self._server, method)(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    # -- API -------------------------------------------------------------------------------------
    def start(self) -> str:
        """Start the first generation and the HTTP server; returns the base URL."""
        warning = exposure_warning(self.config.host, self.config.api_token)
        if warning:
            log.warning("SECURITY: %s", warning)
        if self.config.backend == "ray":
            import ray
            if not ray.is_initialized():
                ray.init(include_dashboard=False)
            from .workers import REPO_ROOT
            # Actors (and the worker actors they create) must import this checkout even when not installed.
            env = {"PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
            state_key = uuid.uuid4().hex[:12]
            self._actor = controller_actor().options(
                runtime_env={"env_vars": env}, max_restarts=CONTROLLER_MAX_RESTARTS,
            ).remote(asdict(self.config), state_key)
            self.url = ray.get(self._actor.start.remote())
            return self.url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="foundry-elastic", daemon=True)
        self._thread.start()

        async def make():
            self._server = ElasticServer(self.config)
        asyncio.run_coroutine_threadsafe(make(), self._loop).result()
        self.url = self._call("start")
        return self.url

    def reconfigure(self, wait: bool = True, timeout: float = 1800.0, **layout: int) -> Dict[str, Any]:
        """Submit ``tp=``/``ep=``/``replicas=``; with ``wait`` block until the job ends. Returns the job."""
        job = self._call("submit", layout)
        deadline = time.monotonic() + timeout
        while wait and job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            job = self._call("job", job["id"])
        return job

    def job(self, job_id: str) -> Optional[Dict[str, Any]]:
        return self._call("job", job_id)

    def supervise(self, timeout: float = 10.0) -> bool:
        """Check the controller; after Ray restarted a crashed one, start its service again. True when it
        serves; False while it is coming back; ControllerLost when it is gone for good (Ray backend only;
        the local backend's controller lives in this process)."""
        if self._actor is None:
            return True
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError
        try:
            url = ray.get(self._actor.ensure_started.remote(), timeout=timeout)
        except ActorDiedError as exc:
            raise ControllerLost(f"the elastic controller died and was not restarted: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        except (GetTimeoutError, RayActorError) as exc:
            log.info("elastic: controller not reachable yet (%s)", type(exc).__name__)
            return False
        if url != self.url:
            log.warning("elastic: the controller now serves on %s (was %s)", url, self.url)
            self.url = url
        return True

    def status(self) -> Dict[str, Any]:
        return self._call("status")

    def stop(self) -> None:
        if self._actor is not None:
            import ray
            try:
                # Bounded: after Ctrl-C the whole process group (Ray's own daemons too) may already be gone.
                ray.get(self._actor.stop.remote(), timeout=STOP_TIMEOUT_S)
            except Exception as exc:  # GetTimeoutError, RayActorError, a dead raylet, ...
                log.warning("elastic: controller did not stop cleanly (%s: %s); Ray may have exited first",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            finally:
                with contextlib.suppress(Exception):
                    ray.kill(self._actor)
                self._actor = None
        elif self._loop is not None:
            if self._server is not None:    # None when start() failed before the server existed
                self._call("stop")
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread:
                self._thread.join(10)
            self._loop = None

    def __enter__(self) -> "ElasticDeployment":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
