"""The elastic controller: runs the deployment as generations and switches between them live.

A *generation* is a set of replicas started together with one layout. A reconfiguration is a job that goes
through timed phases::

    plan -> [shrink_old | drain_old + stop_old (gap)] -> start_new -> wait_healthy -> switch -> drain_old -> stop_old

Strategy (chosen in ``plan`` from the free slots): ``scale`` when only the replica count changes (replicas
are added to or retired from the serving generation, which keeps its id); ``overlap`` when old and new fit
together; ``shrink`` when stopping some old replicas (at least one keeps serving) makes room; ``gap``
otherwise: the old generation is drained and stopped first while the router queues new requests. If the new
generation fails (a worker exits, or it is not healthy in time) the job rolls back: the new generation is
stopped and the old layout serves again (its remaining replicas at once, the stopped ones restarted). Only one
job runs at a time; a second one, or an invalid one, is rejected before any state changes.

Outside a switch the controller keeps the declared layout itself: a replica whose process exited, or whose
``/health`` failed ``health_failures`` times in a row, is taken out of routing, stopped, and replaced by a fresh
one (which restores its graphs from the layout's archive). Replacements are counted (``/status`` ``restarts``,
``foundry_elastic_replica_restarts_total``). A reconfiguration to the current layout is such a repair, done at
once. Stopping the controller ends a running job as ``cancelled`` after everything it started is stopped.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import aiohttp

from foundry_sglang.graphs.keys import RankLayout, layout_dir
from foundry_sglang.graphs.settings import FoundryConfig

from .backends import ReplicaHandle
from .layout import Layout, LayoutError, ModelShape, parse_layout, validate_layout
from .router import Router, RouteSet, Upstream
from .workers import WorkerSpec

log = logging.getLogger("foundry_sglang.elastic.controller")

PHASES = ("plan", "shrink_old", "start_new", "wait_healthy", "switch", "drain_old", "stop_old", "rollback")


def _archive_dir(root: Union[str, os.PathLike], model: str, layout: Layout) -> str:
    """The archive directory of one generation layout (the engines name per-rank files inside it)."""
    return str(layout_dir(root, model, RankLayout(tp_size=layout.tp, ep_size=layout.ep)))


class ControllerBusy(RuntimeError):
    """A reconfiguration is already running (HTTP 409)."""


@dataclass
class ControllerConfig:
    """What the deployment runs and how patient the controller is."""

    model: str
    slots: int
    layout: Layout = field(default_factory=Layout)
    kind: str = "builtin"                 # worker kind: builtin | sglang
    device: str = "cpu"
    foundry: FoundryConfig = field(default_factory=FoundryConfig)  # archive_dir: one subdirectory per layout
    extra_args: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    log_dir: Optional[str] = None         # one log file per replica process
    start_timeout: float = 600.0          # new generation must be healthy within this
    drain_timeout: float = 600.0          # old generation's in-flight requests get this long
    health_interval: float = 0.25
    monitor_interval: float = 1.0         # how often the serving replicas are checked
    health_failures: int = 3              # failed /health checks in a row that make a running replica "failed"
    repair_backoff_max: float = 30.0      # longest wait between attempts to replace a replica
    standby: int = 0                      # warm engines kept on free slots for the next switch (0: none)


@dataclass
class Generation:
    id: int
    layout: Layout
    replicas: List[ReplicaHandle]
    upstreams: List[Upstream] = field(default_factory=list)
    state: str = "starting"      # starting | healthy | active | draining | stopped | failed
    started_at: float = field(default_factory=time.time)
    next_index: int = 0          # a replica added later (regrown, repaired) gets an index, and a log, of its own

    def describe(self) -> Dict[str, Any]:
        return {"id": self.id, "layout": self.layout.to_dict(), "state": self.state,
                "replicas": [r.describe() for r in self.replicas]}


@dataclass
class Job:
    id: str
    target: Layout
    source: Optional[Layout]
    state: str = "running"       # running | succeeded | rolled_back | failed | cancelled
    phase: str = "plan"
    strategy: str = ""
    phases: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    generation: Optional[int] = None
    created: float = field(default_factory=time.time)
    finished: Optional[float] = None

    def describe(self) -> Dict[str, Any]:
        total = sum(v for k, v in self.phases.items())
        return {"id": self.id, "state": self.state, "phase": self.phase, "strategy": self.strategy,
                "from": self.source.to_dict() if self.source else None, "to": self.target.to_dict(),
                "generation": self.generation, "phases_s": {k: round(v, 3) for k, v in self.phases.items()},
                "total_s": round(total, 3), "error": self.error, "created": self.created,
                "finished": self.finished}


class _Timer:
    def __init__(self, job: Job, phase: str):
        self.job, self.phase = job, phase

    def __enter__(self):
        self.job.phase = self.phase
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.job.phases[self.phase] = self.job.phases.get(self.phase, 0.0) + time.monotonic() - self.t0
        return False


class Controller:
    """Owns the slots, the generations and the router's routing table."""

    def __init__(self, config: ControllerConfig, backend: Any, router: Router,
                 shape: Optional[ModelShape] = None):
        self.config, self.backend, self.router, self.shape = config, backend, router, shape
        self.active: Optional[Generation] = None
        self.generations: Dict[int, Generation] = {}
        self.jobs: Dict[str, Job] = {}
        self.current_job: Optional[Job] = None
        self.phase_sum: Dict[str, float] = {}
        self.phase_count: Dict[str, int] = {}
        self.switches = {"succeeded": 0, "rolled_back": 0, "failed": 0, "cancelled": 0}
        self.restarts = 0                    # replicas replaced outside a switch
        self._health_failures: Dict[int, int] = {}   # id(replica) -> failed health checks in a row
        self._repair_backoff = 0.0
        self._next_gen = 1
        self._tasks: List[asyncio.Task] = []
        self._stopping = False
        #: Called with the layout served after every finished job (the Ray actor persists it for its restarts).
        self.on_layout: Optional[Callable[[Layout], None]] = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Validate the initial layout and bring up generation 1."""
        self._validate(self.config.layout)
        job = Job(id="initial", target=self.config.layout, source=None, strategy="initial")
        self.jobs[job.id] = job
        gen = await self._start_generation(job, self.config.layout)
        with _Timer(job, "switch"):
            self._activate(gen)
        self._finish(job, "succeeded")
        self._replenish_standby()
        self._tasks.append(asyncio.ensure_future(self._monitor()))

    # -- standby pool ------------------------------------------------------------------------------
    def _standby_supported(self) -> bool:
        return self.config.standby > 0 and hasattr(self.backend, "replenish")

    def _replenish_standby(self) -> None:
        """Refill the standby pool on free slots (never fails the caller: a standby is an optimisation)."""
        if self._stopping or not self._standby_supported():
            return
        cfg = self.config
        spec = WorkerSpec(model=cfg.model, kind=cfg.kind, device=cfg.device, env=dict(cfg.env),
                          log_path=os.path.join(cfg.log_dir, "standby{n}-slot{slot}.log") if cfg.log_dir else None)
        try:
            self.backend.replenish(spec)
        except Exception as exc:
            log.warning("could not refill the standby pool: %s: %s", type(exc).__name__, exc)

    def standby_status(self) -> Dict[str, Any]:
        """The standby pool as /status and /metrics report it (``ready`` engines are never serving capacity)."""
        if hasattr(self.backend, "standby_status"):
            return self.backend.standby_status()
        return {"target": 0, "ready": 0, "warming": 0, "workers": [], "started": 0, "used": 0, "fallbacks": 0,
                "never_healthy": 0, "disabled": None}

    async def stop(self) -> None:
        """Cancel the monitor and any running job (waiting until they have cleaned up), then stop every replica."""
        self._stopping = True
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        job = self.current_job
        if job is not None:   # cancelled before its task ran, or its task did not get to finish it
            job.error = job.error or "the controller stopped during the reconfiguration"
            self._finish(job, "cancelled")
        self.router.set_active(None)
        for gen in list(self.generations.values()):
            if gen.state != "stopped":
                await self._stop_replicas(gen, gen.replicas)
                gen.state = "stopped"
        if hasattr(self.backend, "shutdown"):
            await self.backend.shutdown()

    # -- API ---------------------------------------------------------------------------------------
    def _slots(self) -> int:
        """The slots a layout may use: the deployment's, or fewer where the hardware holds fewer."""
        have = self.backend.capacity()[0] if hasattr(self.backend, "capacity") else None
        return self.config.slots if have is None else min(self.config.slots, have)

    def _validate(self, layout: Layout) -> None:
        """LayoutError (one line) for a layout the model, the deployment or the hardware cannot hold."""
        validate_layout(layout, self.shape, self.config.slots, self.config.kind)
        if hasattr(self.backend, "capacity"):
            have, where = self.backend.capacity()
            if have is not None and layout.slots > have:
                raise LayoutError(f"{layout} needs {layout.slots} slots (max(tp, ep) * replicas) but {where}")

    def submit(self, body: Any) -> Job:
        """Validate a reconfiguration request and start it. Raises LayoutError (400) or ControllerBusy (409)."""
        if self._stopping:
            raise ControllerBusy("the deployment is shutting down")
        current = self.active.layout if self.active else self.config.layout
        target = parse_layout(body, current)
        if self.current_job is not None:
            raise ControllerBusy(f"reconfiguration {self.current_job.id} is still running "
                                 f"(phase {self.current_job.phase}); try again when it is done")
        self._validate(target)
        job = Job(id=uuid.uuid4().hex[:12], target=target, source=current)
        self.jobs[job.id] = job
        self.current_job = job
        if self.active and target == self.active.layout:
            job.strategy = "repair"     # the layout is kept: check every replica now, replace what failed
            self._tasks.append(asyncio.ensure_future(self._run_repair(job, self.active, probe=True)))
        else:
            self._tasks.append(asyncio.ensure_future(self._run(job)))
        return job

    async def reconfigure(self, body: Any, wait: bool = True) -> Dict[str, Any]:
        job = self.submit(body)
        while wait and job.state == "running":
            await asyncio.sleep(0.1)
        return job.describe()

    def status(self) -> Dict[str, Any]:
        job = self.current_job
        state = ("repairing" if job.strategy == "repair" else "reconfiguring") if job else \
            ("serving" if self.active else "queueing")
        return {
            "model": self.config.model, "kind": self.config.kind, "device": self.config.device,
            "slots": self.config.slots, "backend": getattr(self.backend, "name", "?"),
            "generation": self.active.id if self.active else None,
            "layout": self.active.layout.to_dict() if self.active else None,
            "state": state, "restarts": self.restarts,
            "job": self.current_job.describe() if self.current_job else None,
            "generations": [g.describe() for g in self.generations.values() if g.state != "stopped"],
            "router": {"queued": self.router.stats.queued_now,
                       "inflight": self.router.inflight_by_generation(),
                       "requests": self.router.stats.requests, "failed": self.router.stats.failed,
                       "retries": self.router.stats.retries},
            "switches": dict(self.switches),
            "standby": self.standby_status(),
        }

    # -- the reconfiguration job ---------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        old = self.active
        try:
            with _Timer(job, "plan"):
                job.strategy, keep = self._plan(old, job.target)
            log.info("reconfigure %s: %s -> %s (%s)", job.id, job.source, job.target, job.strategy)
            if job.strategy == "scale":
                try:
                    await self._scale(job, old)
                except Exception as exc:  # the added replicas were stopped again
                    job.error = f"new replicas failed: {exc}"
                    log.warning("reconfigure %s: %s; keeping %s", job.id, job.error, old.layout)
                    self._activate(old)
                    self._finish(job, "rolled_back")
                    return
                self._finish(job, "succeeded")
                return
            if old is not None and job.strategy == "shrink":
                with _Timer(job, "shrink_old"):
                    await self._retire(old, old.replicas[keep:])
            elif old is not None and job.strategy == "gap":
                self.router.set_active(None)    # the router queues from here on
                with _Timer(job, "drain_old"):
                    await self._drain(old, old.replicas)
                with _Timer(job, "stop_old"):
                    await self._stop_replicas(old, old.replicas)
                    old.state = "stopped"
            try:
                new = await self._start_generation(job, job.target)
            except Exception as exc:  # any failure of the new generation rolls back
                job.error = f"new generation failed: {exc}"
                log.warning("reconfigure %s: %s; rolling back", job.id, job.error)
                with _Timer(job, "rollback"):
                    await self._rollback(old)
                self._finish(job, "rolled_back")
                return
            with _Timer(job, "switch"):
                self._activate(new)
            if old is not None and old.state != "stopped":
                old.state = "draining"
                with _Timer(job, "drain_old"):
                    await self._drain(old, old.replicas)
                with _Timer(job, "stop_old"):
                    await self._stop_replicas(old, old.replicas)
                    old.state = "stopped"
            self._finish(job, "succeeded")
        except asyncio.CancelledError:
            job.error = "the controller stopped during the reconfiguration"
            self._finish(job, "cancelled")
            raise
        except Exception as exc:  # keep the controller alive, report the job as failed
            log.exception("reconfigure %s failed", job.id)
            job.error = f"{type(exc).__name__}: {exc}"
            self._finish(job, "failed")

    def _plan(self, old: Optional[Generation], target: Layout):
        """Return (strategy, number of old replicas kept while the new generation starts)."""
        if old is None:
            return "gap", 0
        if (target.tp, target.ep) == (old.layout.tp, old.layout.ep):
            return "scale", 0         # same engines, only the replica count changes: no new generation
        slots = self._slots()
        free = slots - old.layout.slots_per_replica * len(old.replicas)
        if target.slots <= free:
            return "overlap", len(old.replicas)
        per = old.layout.slots_per_replica
        keep = (slots - target.slots) // per
        if keep >= 1:
            return "shrink", min(keep, len(old.replicas))
        return "gap", 0

    async def _scale(self, job: Job, gen: Generation) -> None:
        """Change the replica count of the serving generation in place (tp and ep unchanged)."""
        have, want = len(gen.replicas), job.target.replicas
        if want > have:
            try:
                await self._start_generation(job, Layout(gen.layout.tp, gen.layout.ep, want - have), gen=gen)
            finally:
                gen.layout = Layout(gen.layout.tp, gen.layout.ep, len(gen.replicas))
            with _Timer(job, "switch"):
                self._activate(gen)
        else:
            with _Timer(job, "switch"):
                self.router.remove_upstreams(self._upstreams_of(gen, gen.replicas[want:]))
            with _Timer(job, "drain_old"):
                await self._drain(gen, gen.replicas[want:])
            with _Timer(job, "stop_old"):
                await self._stop_replicas(gen, gen.replicas[want:])
            gen.layout = job.target

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.phase, job.finished = state, "done", time.time()
        if job.id != "initial" and job.strategy not in ("noop", "repair"):
            self.switches[state] = self.switches.get(state, 0) + 1
            for k, v in job.phases.items():
                self.phase_sum[k] = self.phase_sum.get(k, 0.0) + v
                self.phase_count[k] = self.phase_count.get(k, 0) + 1
        if self.current_job is job:
            self.current_job = None
        self._replenish_standby()
        if self.on_layout is not None and self.active is not None:
            try:
                self.on_layout(self.active.layout)
            except Exception as exc:  # persistence is best effort; serving goes on
                log.warning("could not record the layout %s: %s", self.active.layout, exc)
        log.info("job %s %s: %s", job.id, state,
                 ", ".join(f"{k} {v:.2f}s" for k, v in job.phases.items()))

    # -- generations -------------------------------------------------------------------------------
    def _spec_for(self, layout: Layout, gen_id: int, first: int = 0):
        """Replica ``index``'s spec; ``first``: the generation's next unused replica index (``Generation.next_index``),
        so that a replica added later has a log of its own."""
        cfg = self.config

        def make(index: int) -> WorkerSpec:
            index += first
            foundry = (cfg.foundry.with_archive_dir(_archive_dir(cfg.foundry.archive_dir, cfg.model, layout))
                       if cfg.foundry.enabled else cfg.foundry)
            log_path = (os.path.join(cfg.log_dir, f"gen{gen_id}-tp{layout.tp}-ep{layout.ep}-r{index}.log")
                        if cfg.log_dir else None)
            return WorkerSpec(model=cfg.model, tp=layout.tp, ep=layout.ep, kind=cfg.kind, device=cfg.device,
                              foundry=foundry,
                              extra_args=list(cfg.extra_args), env=dict(cfg.env), log_path=log_path)
        return make

    async def _start_generation(self, job: Job, layout: Layout,
                                gen: Optional[Generation] = None) -> Generation:
        """Allocate and start ``layout``'s replicas (into ``gen`` when re-growing one) and wait until all
        are healthy. On failure everything started here is stopped again before the error propagates."""
        gen_id = gen.id if gen else self._next_gen
        if gen is None:
            self._next_gen += 1
        job.generation = gen_id
        replicas: List[ReplicaHandle] = []
        try:
            with _Timer(job, "start_new"):
                first = gen.next_index if gen is not None else 0
                replicas = await self.backend.allocate(gen_id, layout, self._spec_for(layout, gen_id, first=first))
                for i, r in enumerate(replicas):
                    r.index = first + i
                if gen is None:
                    gen = Generation(gen_id, layout, [])
                    self.generations[gen_id] = gen
                gen.next_index = first + len(replicas)
                gen.replicas.extend(replicas)
                # A fresh archive is captured by the first replica; the others then restore it.
                foundry = self.config.foundry
                first_save = (foundry.enabled and len(replicas) > 1 and not os.path.isdir(
                    _archive_dir(foundry.archive_dir, self.config.model, layout)))
                if first_save:
                    await replicas[0].start()
            with _Timer(job, "wait_healthy"):
                if first_save:
                    await self._wait_healthy(replicas[:1])
                    await asyncio.gather(*(r.start() for r in replicas[1:]))
                else:
                    await asyncio.gather(*(r.start() for r in replicas))
                await self._wait_healthy(replicas)
        except BaseException:
            if gen is not None:
                gen.replicas = [r for r in gen.replicas if r not in replicas]
                if not gen.replicas:
                    gen.state = "failed"
            await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)
            raise
        gen.upstreams.extend(Upstream(r.url, gen_id) for r in replicas)
        if gen.state in ("starting", "failed"):
            gen.state = "healthy"
        return gen

    async def _wait_healthy(self, replicas: List[ReplicaHandle]) -> None:
        deadline = time.monotonic() + self.config.start_timeout
        pending = list(replicas)
        session = await self.router.session()
        while pending:
            for r in list(pending):
                code = await r.returncode()
                if code is not None:
                    raise RuntimeError(f"replica {r.index} (pid {r.pid}) exited with status {code} while starting")
                try:
                    async with session.get(r.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            pending.remove(r)
                            r.on_healthy()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
            if pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(pending)} replica(s) not healthy within {self.config.start_timeout:.0f}s")
                await asyncio.sleep(self.config.health_interval)

    def _activate(self, gen: Generation) -> None:
        gen.state = "active"
        self.active = gen
        self.router.set_active(RouteSet(gen.id, list(gen.upstreams)))

    def _upstreams_of(self, gen: Generation, replicas: List[ReplicaHandle]) -> List[Upstream]:
        urls = {r.url for r in replicas}
        return [u for u in gen.upstreams if u.url in urls]

    async def _drain(self, gen: Generation, replicas: List[ReplicaHandle]) -> None:
        ups = self._upstreams_of(gen, replicas)
        if not await self.router.wait_idle(ups, self.config.drain_timeout):
            log.warning("generation %d: %d request(s) still running after %.0fs drain; stopping anyway",
                        gen.id, self.router.outstanding(ups), self.config.drain_timeout)

    async def _retire(self, gen: Generation, replicas: List[ReplicaHandle]) -> None:
        """Shrink a serving generation: stop routing to ``replicas``, drain them, stop them."""
        self.router.remove_upstreams(self._upstreams_of(gen, replicas))
        await self._drain(gen, replicas)
        await self._stop_replicas(gen, replicas)

    async def _stop_replicas(self, gen: Generation, replicas: List[ReplicaHandle]) -> None:
        replicas = list(replicas)
        await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)
        urls = {r.url for r in replicas}
        gen.replicas = [r for r in gen.replicas if r not in replicas]
        gen.upstreams = [u for u in gen.upstreams if u.url not in urls]
        if not gen.replicas:
            self.router.forget_generation(gen.id)

    async def _rollback(self, old: Optional[Generation]) -> None:
        """Serve the old layout again: what is left of it now, and restart what was stopped."""
        if old is None:
            return
        missing = old.layout.replicas - len(old.replicas)
        if old.replicas:
            self._activate(old)           # the kept replicas serve at once
        if missing:
            regrow = Job(id="rollback", target=old.layout, source=None)
            await self._start_generation(regrow, Layout(old.layout.tp, old.layout.ep, missing), gen=old)
            self._activate(old)

    # -- health monitor and repair ------------------------------------------------------------------
    async def _failed_replicas(self, gen: Generation, probe: bool) -> List[ReplicaHandle]:
        """Replicas of ``gen`` whose process exited or whose /health failed too often (``probe``: one failed
        check is enough)."""
        failed = []
        session = await self.router.session()
        for r in list(gen.replicas):
            if (await r.returncode()) is not None:
                failed.append(r)
                continue
            try:
                async with session.get(r.url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    ok = resp.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            n = 0 if ok else self._health_failures.get(id(r), 0) + 1
            self._health_failures[id(r)] = n
            if n >= (1 if probe else self.config.health_failures):
                failed.append(r)
        return failed

    async def _repair(self, job: Job, gen: Generation, failed: List[ReplicaHandle]) -> int:
        """Take ``failed`` out of routing, stop them, and start replicas until ``gen`` has its declared count.
        Returns the number of replicas started."""
        if failed:
            log.warning("generation %d: replica(s) %s failed (exited or unhealthy); replacing them",
                        gen.id, [r.index for r in failed])
            with _Timer(job, "stop_old"):
                self.router.remove_upstreams(self._upstreams_of(gen, failed))
                await self._stop_replicas(gen, failed)
            for r in failed:
                self._health_failures.pop(id(r), None)
        missing = gen.layout.replicas - len(gen.replicas)
        if missing <= 0:
            return 0
        await self._start_generation(job, Layout(gen.layout.tp, gen.layout.ep, missing), gen=gen)
        self.restarts += missing
        with _Timer(job, "switch"):
            self._activate(gen)
        log.info("generation %d: %d replica(s) replaced; %s serving again", gen.id, missing, gen.layout)
        return missing

    async def _run_repair(self, job: Job, gen: Generation, probe: bool = False,
                          failed: Optional[List[ReplicaHandle]] = None) -> None:
        """A repair as a job: one at a time with reconfigurations, visible in /status while it runs."""
        try:
            if failed is None:
                failed = await self._failed_replicas(gen, probe)
            started = await self._repair(job, gen, failed)
            if not failed and not started:
                job.strategy = "noop"
            self._repair_backoff = 0.0
            self._finish(job, "succeeded")
        except asyncio.CancelledError:
            job.error = "the controller stopped during the repair"
            self._finish(job, "cancelled")
            raise
        except Exception as exc:  # retried by the monitor with a growing pause
            job.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._repair_backoff = min(self.config.repair_backoff_max, max(1.0, 2 * self._repair_backoff))
            log.warning("generation %d: replacing replicas failed (%s); next attempt in %.0fs",
                        gen.id, job.error, self._repair_backoff)
            if gen.state == "failed":
                gen.state = "active"     # still the declared generation; the monitor tries again
            self._finish(job, "failed")

    async def _monitor(self) -> None:
        """Keep the active generation at its declared replica count (see the module docstring)."""
        while not self._stopping:
            await asyncio.sleep(self.config.monitor_interval + self._repair_backoff)
            gen = self.active
            if gen is None or self.current_job is not None:
                continue
            self._replenish_standby()       # a standby that exited is replaced between jobs
            try:
                failed = await self._failed_replicas(gen, probe=False)
            except Exception as exc:  # the monitor must outlive any one check
                log.warning("health check of generation %d failed: %s", gen.id, exc)
                continue
            if self.current_job is not None or self.active is not gen:
                continue     # a reconfiguration started while we were checking: it owns the replicas now
            if failed or len(gen.replicas) < gen.layout.replicas:
                job = Job(id="repair-" + uuid.uuid4().hex[:8], target=gen.layout, source=gen.layout,
                          strategy="repair")
                self.jobs[job.id] = job
                self.current_job = job
                await self._run_repair(job, gen, failed=failed)

    async def health(self) -> Dict[str, Any]:
        """What /health answers: ``ok`` (all declared replicas serve), ``degraded`` (some do), ``reconfiguring``
        / ``repairing`` / ``queueing`` (requests are held until replicas serve), ``unavailable`` (nothing can
        serve and nothing is being done about it) or ``stopping``; ``code`` is 503 for the last two."""
        st = self.status()
        gen = self.active
        live = 0
        if gen is not None:
            for r in gen.replicas:
                if (await r.returncode()) is None and self._health_failures.get(id(r), 0) == 0:
                    live += 1
            live = min(live, self.router.routable())
        if self._stopping:
            state = "stopping"
        elif st["state"] in ("reconfiguring", "repairing") and not live:
            state = st["state"]
        elif gen is None:
            state = "queueing" if self.current_job else "unavailable"
        elif live == 0:
            state = "unavailable"
        elif live < gen.layout.replicas:
            state = "degraded"
        else:
            state = "ok"
        return {"status": state, "code": 503 if state in ("unavailable", "stopping") else 200,
                "generation": st["generation"], "layout": st["layout"], "live_replicas": live,
                "restarts": self.restarts}
