"""Where workers run: Ray placement groups (production, CPU tests) or plain local processes (no Ray).

Both backends hand the controller ``ReplicaHandle`` objects with the same async methods, so the controller's
state machine does not know which one it drives. ``RayBackend`` reserves one placement group per generation
(one bundle of ``tp * ep`` slots per replica) and hosts each worker in a Ray actor bound to its bundle; the
actor reads its GPU ids from Ray and passes them to the server as ``CUDA_VISIBLE_DEVICES``. ``LocalBackend``
hands out slot ids itself; it exists for machines without Ray (the GPU check carries no 79 MB Ray wheel).
Either may keep a pool of standby workers (warm engines on free slots) that later replicas are handed to.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from foundry_sglang.graphs.router import one_line

from .layout import Layout
from .workers import ProcessWorker, WorkerSpec, distinct, rank_placement

log = logging.getLogger("foundry_sglang.elastic.backends")


class SlotsUnavailable(RuntimeError):
    """The backend could not reserve the slots a generation needs."""


class ReplicaHandle:
    """One running replica, as the controller sees it."""

    index: int
    url: Optional[str] = None
    pid: Optional[int] = None
    slots: Sequence[Any] = ()
    healthy: bool = False  # set by the controller once the replica answered /health

    def on_healthy(self) -> None:
        """The controller saw this replica answer ``/health`` for the first time."""
        self.healthy = True

    async def start(self) -> str:
        raise NotImplementedError

    async def returncode(self) -> Optional[int]:
        """None while the server runs; its exit status (or -1 when unreachable) otherwise."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"index": self.index, "url": self.url, "pid": self.pid, "slots": list(self.slots)}


SpecFactory = Callable[[int], WorkerSpec]  # replica index -> spec
#: Standby workers in a row that may exit before they are warm before the pool stops starting them.
STANDBY_MAX_FAILURES = 3
#: Replicas started from standbys in a row that may fail before they are healthy before no standby is used.
STANDBY_MAX_ACTIVATION_FAILURES = 2


class _StandbyPool:
    """What both backends count about their standby pools, and when they stop using standbys."""

    def __init__(self, standby: int, coreside: bool = False) -> None:
        self.coreside = coreside
        self.standby_target = max(0, int(standby))
        self.standby_started = self.standby_used = self.standby_fallbacks = 0
        self.standby_failures = 0                      # standbys in a row that exited before they were warm
        self.standby_activation_failures = 0           # replicas from standbys in a row that never became healthy
        self.standby_activation_failed_total = 0
        self.standby_disabled: Optional[str] = None    # why no more standbys are started or used

    def _standby_exited(self, pid: Optional[int], where: str, code: Optional[int], was_warm: bool) -> None:
        """A waiting standby is gone. STANDBY_MAX_FAILURES in a row that never got warm disable the pool."""
        self.standby_failures = 0 if was_warm else self.standby_failures + 1
        log.warning("standby pid %s %s exited with status %s%s; replacing it", pid, where, code,
                    "" if self.standby_failures == 0 else " before it was warm")
        if self.standby_failures >= STANDBY_MAX_FAILURES and not self.standby_disabled:
            self.standby_disabled = (f"{self.standby_failures} standby workers in a row exited before they "
                                     f"were warm (see their logs); no more standby workers")
            log.error("%s", self.standby_disabled)

    def standby_activation_failed(self, pid: Optional[int]) -> None:
        """A replica started from a standby exited before it was ever healthy (its layout's server could not
        start in the standby). After STANDBY_MAX_ACTIVATION_FAILURES in a row no standby is used or started:
        switches start fresh workers, as without standbys."""
        self.standby_activation_failures += 1
        self.standby_activation_failed_total += 1
        log.warning("the replica started from standby pid %s never became healthy (see the standby's log)", pid)
        if self.standby_activation_failures >= STANDBY_MAX_ACTIVATION_FAILURES and not self.standby_disabled:
            self.standby_disabled = (f"{self.standby_activation_failures} replicas in a row started from standby "
                                     "workers never became healthy (see their logs); fresh workers from now on")
            log.error("%s", self.standby_disabled)

    def _standby_summary(self, workers: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"target": self.standby_target, "ready": sum(w["state"] == "ready" for w in workers),
                "warming": sum(w["state"] == "warming" for w in workers), "workers": workers,
                "started": self.standby_started, "used": self.standby_used, "fallbacks": self.standby_fallbacks,
                "never_healthy": self.standby_activation_failed_total, "disabled": self.standby_disabled,
                "coreside": self.coreside}


class _StandbyReplica(ReplicaHandle):
    """A replica that a standby may have become (either backend)."""

    backend: _StandbyPool
    from_standby = False
    _counted = False           # a failed activation is counted once

    def describe(self) -> Dict[str, Any]:
        return dict(super().describe(), from_standby=self.from_standby)

    def on_healthy(self) -> None:
        super().on_healthy()
        if self.from_standby:
            self.backend.standby_activation_failures = 0

    def _count_failed_activation(self, exited: bool) -> None:
        """Handed its layout, then exited before it ever served: the standby's launch failed. (A replica stopped
        because a sibling failed or the start timed out is still running here and is not counted.)"""
        if self.from_standby and not self.healthy and not self._counted and exited:
            self._counted = True
            self.backend.standby_activation_failed(self.pid)


# --------------------------------------------------------------------------------------------- local
class _LocalReplica(_StandbyReplica):
    def __init__(self, backend: "LocalBackend", index: int, spec: WorkerSpec, slots: Sequence[int],
                 standby: Optional[ProcessWorker] = None, spares: Sequence[ProcessWorker] = ()):
        self.backend, self.index, self.spec, self.slots = backend, index, spec, list(slots)
        self.worker = ProcessWorker()
        self.standby = standby          # warm engine on slots[0]: becomes this replica's server (rank 0)
        self.spares = list(spares)      # standbys on this replica's other slots: stopped to free them

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        if self.spares:
            spares, self.spares = self.spares, []
            await asyncio.gather(*(loop.run_in_executor(None, w.stop, 2.0) for w in spares))
        standby, self.standby = self.standby, None
        if standby is not None:
            try:
                self.url = standby.activate(self._standby_spec())
                self.worker, self.from_standby = standby, True
                self.backend.standby_used += 1
            except (OSError, RuntimeError, ValueError) as exc:  # never fail a start for a bad standby
                log.warning("standby pid %s unusable (%s); starting a fresh worker instead", standby.pid, exc)
                self.backend.standby_fallbacks += 1
                await loop.run_in_executor(None, standby.stop, 2.0)
        if not self.from_standby:
            self.url = self.worker.start(self.spec, gpu_ids=self.backend.gpus_of(self.slots))
        self.pid = self.worker.pid
        return self.url

    def _standby_spec(self) -> WorkerSpec:
        """A standby sees all of the backend's GPUs: tell its ranks which of them are this replica's
        (ValueError, and so a fresh worker, where the engine cannot express the placement)."""
        flags = rank_placement(self.spec, self.backend.gpus_of(self.slots), self.backend.visible)
        return replace(self.spec, extra_args=list(self.spec.extra_args) + flags) if flags else self.spec

    async def returncode(self) -> Optional[int]:
        return self.worker.returncode()

    async def stop(self) -> None:
        self._count_failed_activation(self.worker.returncode() is not None)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        self.backend._give_back(self.slots)
        self.slots = []


class LocalBackend(_StandbyPool):
    """Workers as child processes of the controller. ``slots`` gives each slot's GPU id (cuda; a repeated id
    makes slots share that GPU: ranks and replicas on one GPU) or any numbers (cpu); slots are numbered
    0..n-1 in that order.

    With ``standby`` > 0 the backend keeps up to that many warm engines (``engine --standby``) on free slots,
    one slot each (a standby holds its GPU). They are not serving capacity: a slot with a standby is free for
    planning, and a replica allocated on it turns the standby into its server (rank 0) instead of starting a
    process; standbys on a replica's other slots are stopped. ``replenish`` refills the pool.

    ``coreside``: when no free slot is left, a standby may also sit on a slot that serves (it holds its imports
    and a CUDA context there, no weights). It waits there, unused, until a switch stops the replica on its slot;
    then the new layout's replica is handed the standby: a TP2→TP1 switch finds a warm engine although TP=2 held
    every GPU.
    """

    name = "local"

    def __init__(self, slots: Sequence[int], standby: int = 0, coreside: bool = False):
        self.gpus: List[int] = list(slots)                   # slot i runs on GPU gpus[i]
        self.visible: List[int] = distinct(self.gpus)        # what a standby (serving any slots) sees
        self.all_slots: List[int] = list(range(len(self.gpus)))
        self.free: List[int] = list(self.all_slots)          # slots with neither a replica nor a standby
        self.held: Set[int] = set()                          # slots a replica serves on
        super().__init__(standby, coreside)
        self.standbys: Dict[int, ProcessWorker] = {}   # slot -> warm engine (its slot is not in self.free)

    def capacity(self) -> Tuple[Optional[int], str]:
        """How many slots this backend has at all, and where (for a one-line refusal)."""
        return len(self.all_slots), f"the local backend has {len(self.all_slots)} slot(s) {self.gpus}"

    def gpus_of(self, slots: Sequence[int]) -> List[int]:
        """The GPU of each of ``slots`` (one per rank)."""
        return [self.gpus[s] for s in slots]

    def _idle_standbys(self) -> List[int]:
        """Slots of standbys that no replica serves on (a co-resident standby waits for its slot to free)."""
        return sorted(slot for slot in self.standbys if slot not in self.held)

    async def allocate(self, gen_id: int, layout: Layout, spec_for: SpecFactory) -> List[ReplicaHandle]:
        available = len(self.free) + len(self._idle_standbys())
        if layout.slots > available:
            raise SlotsUnavailable(f"{layout} needs {layout.slots} slots, {available} free")
        handles: List[ReplicaHandle] = []
        n = layout.slots_per_replica
        for i in range(layout.replicas):
            standby = None
            take: List[int] = []
            idle = [] if self.standby_disabled else self._idle_standbys()
            if idle:                              # rank 0 on a warm engine (one that is ready first)
                slot = min(idle, key=lambda s: (not self.standbys[s].standby_ready(), s))
                standby = self.standbys.pop(slot)
                take.append(slot)
            while len(take) < n and self.free:    # then plain free slots
                take.append(self.free.pop(0))
            spares = []
            while len(take) < n:                  # then other idle standbys' slots (those standbys are stopped)
                slot = self._idle_standbys()[0]
                spares.append(self.standbys.pop(slot))
                take.append(slot)
            self.held.update(take)
            handles.append(_LocalReplica(self, i, spec_for(i), take, standby, spares))
        return handles

    def replenish(self, spec: WorkerSpec) -> int:
        """Drop standbys that exited and start new ones on free slots up to the target; returns how many started.
        ``spec`` gives the worker kind, device, environment and log path (``{slot}`` and ``{n}``, the standby's
        number, in it are filled in).
        Once the pool is disabled its idle standbys are stopped."""
        for slot, w in list(self.standbys.items()):
            if w.returncode() is not None:
                self._standby_exited(w.pid, f"on slot {slot}", w.returncode(), w.was_warm())
                w.stop()
                self._drop_standby(slot)
        if self.standby_disabled:
            for slot, w in list(self.standbys.items()):  # off the controller's event loop: a stop may wait
                threading.Thread(target=w.stop, args=(2.0,), name="standby-stop", daemon=True).start()
                self._drop_standby(slot)
            return 0
        started = 0
        while len(self.standbys) < self.standby_target:
            if self.free:
                slot = self.free.pop(0)
            else:
                serving = sorted(self.held - set(self.standbys)) if self.coreside else []
                if not serving:
                    break
                slot = serving[0]
            w = ProcessWorker()
            # each standby its own log: a co-resident one and the server a standby became may share a slot
            s = replace(spec, log_path=spec.log_path.format(slot=slot, n=self.standby_started + 1)
                        if spec.log_path else None)
            try:
                if spec.device == "cuda":
                    w.start_standby(s, gpu_ids=self.visible, gpu_index=self.visible.index(self.gpus[slot]))
                else:
                    w.start_standby(s)
            except (OSError, ValueError) as exc:
                log.warning("cannot start a standby worker on slot %s: %s", slot, exc)
                if slot not in self.held:
                    self._give_back([slot])
                break
            self.standbys[slot] = w
            self.standby_started += 1
            started += 1
        return started

    def standby_status(self) -> Dict[str, Any]:
        workers = [{"slot": slot, "pid": w.pid, "state": "ready" if w.standby_ready() else
                    ("warming" if w.returncode() is None else "exited"), "coresident": slot in self.held}
                   for slot, w in sorted(self.standbys.items())]
        return self._standby_summary(workers)

    def _give_back(self, slots: Sequence[int]) -> None:
        """A replica's slots, or a standby's, are free again; a slot that keeps a (co-resident) standby is the
        standby's, not free."""
        self.held -= set(slots)
        self.free = sorted((set(self.free) | set(slots)) - set(self.standbys))  # slot numbers: no two alike

    def _drop_standby(self, slot: int) -> None:
        """Forget the standby on ``slot``; its slot is free unless a replica serves there."""
        del self.standbys[slot]
        if slot not in self.held:
            self._give_back([slot])

    async def shutdown(self) -> None:
        """Stop the standby pool (the replicas are the controller's to stop)."""
        standbys = list(self.standbys.items())
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, w.stop, 2.0) for _, w in standbys))
        for slot, _ in standbys:
            self._drop_standby(slot)


# ----------------------------------------------------------------------------------------------- ray
_worker_actor_cls = None
_bundle_gpus_fn = None
#: Ray leaves CUDA_VISIBLE_DEVICES alone in an actor started with this set: a standby sees its node's GPUs.
RAY_NOSET_CUDA_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def ray_gpu_ids(assigned: Sequence[Any]) -> List[str]:
    """Ray's GPU ids for an actor as CUDA_VISIBLE_DEVICES entries: indices, or UUIDs where the node's own
    CUDA_VISIBLE_DEVICES names GPUs by UUID (so never ``int()``)."""
    return [str(g) for g in assigned]


def node_gpu_ids(visible_env: Optional[str], node_gpus: float) -> List[str]:
    """Every GPU of a node in Ray's id space: the raylet's CUDA_VISIBLE_DEVICES where it had one, else
    0..n-1 for the node's ``node_gpus``."""
    if visible_env:
        return [g.strip() for g in visible_env.split(",") if g.strip()]
    return [str(i) for i in range(int(node_gpus))]


def spread(ids: Sequence[str], ranks: int) -> List[str]:
    """One of ``ids`` per rank, in order; fewer ids than ranks: consecutive ranks share them."""
    return [ids[r * len(ids) // ranks] for r in range(ranks)] if 0 < len(ids) < ranks else list(ids)


def _worker_actor():
    """The Ray actor class hosting one ProcessWorker (defined lazily: importing ray is slow)."""
    global _worker_actor_cls
    if _worker_actor_cls is None:
        import os

        import ray

        @ray.remote
        class EngineWorkerActor:
            def __init__(self) -> None:
                self.worker = ProcessWorker()
                self.visible: List[str] = []    # a standby's: the GPUs of the node its process sees

            def start(self, spec: Dict[str, Any], gpu_ids: Optional[List[str]] = None) -> Dict[str, Any]:
                """A fresh server on this actor's GPUs (Ray's), or on ``gpu_ids``, one per rank."""
                s = WorkerSpec(**spec)
                if gpu_ids is None:
                    gpu_ids = spread(ray_gpu_ids(ray.get_gpu_ids()), max(s.tp, s.ep)) if s.device == "cuda" else []
                url = self.worker.start(s, gpu_ids=gpu_ids)
                return {"url": url, "pid": self.worker.pid, "gpu_ids": gpu_ids}

            def where(self) -> Dict[str, Any]:
                """This actor's node and GPUs: ``gpu_ids`` Ray gave it, ``node_gpus`` every GPU of its node
                (what CUDA_VISIBLE_DEVICES left to it: all of them in an actor run with RAY_NOSET_CUDA_ENV)."""
                node = ray.get_runtime_context().get_node_id()
                gpus = next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
                return {"node_ip": ray.util.get_node_ip_address(), "gpu_ids": ray_gpu_ids(ray.get_gpu_ids()),
                        "node_gpus": node_gpu_ids(os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)}

            def start_standby(self, spec: Dict[str, Any]) -> Dict[str, Any]:
                """A warm engine warmed up on this actor's GPU and seeing every GPU of the node, so that any
                replica placed on this node can be handed to it."""
                s = WorkerSpec(**spec)
                here = self.where()
                if s.device == "cuda":
                    self.visible = here["node_gpus"]
                    self.worker.start_standby(s, gpu_ids=self.visible,
                                              gpu_index=self.visible.index(here["gpu_ids"][0]))
                else:
                    self.worker.start_standby(s)
                return dict(here, pid=self.worker.pid)

            def standby_state(self) -> Dict[str, Any]:
                return {"ready": self.worker.standby_ready(), "warm": self.worker.was_warm(),
                        "returncode": self.worker.returncode()}

            def activate(self, spec: Dict[str, Any], rank_gpus: List[str]) -> Dict[str, Any]:
                """Hand this standby its layout; ``rank_gpus``: each rank's GPU (cuda)."""
                s = WorkerSpec(**spec)
                flags = rank_placement(s, rank_gpus, self.visible) if self.visible else []
                if flags:
                    s = replace(s, extra_args=list(s.extra_args) + flags)
                return {"url": self.worker.activate(s), "pid": self.worker.pid}

            def returncode(self) -> Optional[int]:
                return self.worker.returncode()

            def health(self) -> bool:
                return self.worker.health()

            def stop(self) -> None:
                self.worker.stop()

        _worker_actor_cls = EngineWorkerActor
    return _worker_actor_cls


def _bundle_gpus():
    """A Ray task that reports the GPU ids of the bundle it runs in."""
    global _bundle_gpus_fn
    if _bundle_gpus_fn is None:
        import ray

        @ray.remote
        def bundle_gpus() -> List[str]:
            return ray_gpu_ids(ray.get_gpu_ids())

        _bundle_gpus_fn = bundle_gpus
    return _bundle_gpus_fn


def _in_group(group: Any) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0)


def _one_line(exc: BaseException) -> str:
    """``one_line`` of an error; for one raised inside a Ray actor, of the actor's own exception."""
    cause = getattr(exc, "cause", None)        # RayTaskError: the exception the actor method raised
    return one_line(cause if isinstance(cause, BaseException) else exc)


class _RayStandby:
    """A warm engine in an actor that holds one slot (its own placement group). Its state is polled without
    blocking: ``refresh`` collects the answer of the previous poll and asks again."""

    def __init__(self, number: int, name: str, group: Any, actor: Any, started: Any):
        self.number, self.name, self.group, self.actor = number, name, group, actor
        # actor.start_standby's answer, and later the pending state poll, as futures: checked without blocking
        # (the controller may be an async Ray actor, where a blocking ray.get must not run)
        self.started = started.future() if started is not None else None
        self.created = time.monotonic()
        self.info: Optional[Dict[str, Any]] = None    # pid, node_ip, gpu_ids once its process runs
        self.ready = self.warm = False
        self.exit_code: Optional[int] = None
        self._poll: Any = None

    @property
    def pid(self) -> Optional[int]:
        return self.info["pid"] if self.info else None

    def state(self) -> str:
        if self.exit_code is not None:
            return "exited"
        return "ready" if self.ready else ("warming" if self.info else "placing")

    def _take(self, answer: Dict[str, Any]) -> None:
        self.ready, self.warm, self.exit_code = answer["ready"], answer["warm"] or self.warm, answer["returncode"]

    def refresh(self) -> None:
        if self.exit_code is not None:
            return
        try:
            if self.info is None:
                if self.started is None or not self.started.done():
                    return                      # its placement group is not placed yet
                self.info = self.started.result()
            if self._poll is not None and self._poll.done():
                self._take(self._poll.result())
                self._poll = None
            if self._poll is None and self.exit_code is None:
                self._poll = self.actor.standby_state.remote().future()
        except Exception as exc:  # the actor died, or its process could not start
            log.warning("standby %s: %s", self.name, _one_line(exc))
            self.exit_code = -1

    async def state_now(self, timeout: float = 10.0) -> None:
        """Wait for this standby's current state (a standby not placed yet stays 'placing')."""
        self.refresh()                          # takes a finished poll and asks again
        if self._poll is None:                  # not placed yet, or gone
            return
        try:
            self._take(await asyncio.wait_for(asyncio.wrap_future(self._poll), timeout))
        except Exception as exc:
            log.warning("standby %s does not answer: %s", self.name, _one_line(exc))
            self.exit_code = -1
        self._poll = None


class _RayReplica(_StandbyReplica):
    """A replica's actor and placement groups. From a standby: the standby's actor (rank 0, its slot) and a
    group of the other ranks' slots on the standby's node."""

    def __init__(self, backend: "RayBackend", index: int, spec: WorkerSpec, n: int, groups: List[Any],
                 actor: Any = None, standby: Optional[_RayStandby] = None):
        self.backend, self.index, self.spec, self.n = backend, index, spec, n
        self.groups, self.standby = groups, standby
        self.actor = standby.actor if standby is not None else actor   # what stop() stops, even before start()

    async def start(self) -> str:
        standby, self.standby = self.standby, None
        if standby is None:
            info = await self.actor.start.remote(self.spec.to_dict())
            self.url, self.pid, self.slots = info["url"], info["pid"], info["gpu_ids"]
            return self.url
        rank_gpus = await self._rank_gpus(standby)
        try:
            info = await asyncio.wait_for(standby.actor.activate.remote(self.spec.to_dict(), rank_gpus), 60)
            self.from_standby = True
            self.backend.standby_used += 1
        except Exception as exc:  # never fail a start for a bad standby
            log.warning("standby pid %s unusable (%s); starting a fresh worker instead", standby.pid,
                        _one_line(exc))
            self.backend.standby_fallbacks += 1
            self.backend.kill(standby.actor)
            self.actor = self.backend.new_actor(standby.group, 1)
            info = await self.actor.start.remote(self.spec.to_dict(), rank_gpus or None)
        self.url, self.pid, self.slots = info["url"], info["pid"], rank_gpus
        return self.url

    async def _rank_gpus(self, standby: _RayStandby) -> List[str]:
        """Each rank's GPU: the standby's for rank 0, the extra group's for the others ([] on CPU)."""
        mine = standby.info["gpu_ids"] if standby.info else []
        if not mine or self.n == 1:             # CPU, or a one-rank replica
            return mine[:1]
        others = await _bundle_gpus().options(num_cpus=0, num_gpus=(self.n - 1) * self.backend.per_slot,
                                              scheduling_strategy=_in_group(self.groups[-1])).remote()
        return mine[:1] + spread(others, self.n - 1)

    async def returncode(self) -> Optional[int]:
        try:
            return await self.actor.returncode.remote()
        except Exception:  # the actor itself died: its server is gone too
            return -1

    async def stop(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.from_standby:
            self._count_failed_activation(await self.returncode() is not None)
        try:
            await asyncio.wait_for(self.actor.stop.remote(), timeout=30)
        except Exception as exc:  # best effort; the actor is killed next anyway
            log.warning("replica %d did not stop cleanly: %s", self.index, _one_line(exc))
        self.backend.kill(self.actor)
        for group in self.groups:
            remove_placement_group(group)
        if self.groups:
            self.backend.held -= self.n
        self.groups = []


class RayBackend(_StandbyPool):
    """One placement group per replica (a single STRICT_PACK bundle of tp*ep slots), so a generation can
    shrink replica by replica; each replica's worker is an actor bound to its bundle.

    With ``standby`` > 0 the backend keeps up to that many warm engines, each in an actor holding one slot (its
    own placement group), within the deployment's ``slots``. A replica allocated while a standby waits is
    handed to it (rank 0), and its other ranks' slots are reserved on the standby's node; standbys whose slots
    a layout needs are stopped. ``replenish`` refills the pool without blocking.
    """

    name = "ray"

    def __init__(self, device: str = "cpu", placement_timeout: float = 60.0, instance: str = "",
                 slots_per_gpu: int = 1, standby: int = 0, slots: Optional[int] = None):
        """``slots_per_gpu`` > 1: each slot is that share of a GPU (ranks and replicas share GPUs);
        ``slots``: the deployment's slots, which replicas and standbys share (None: the cluster's)."""
        super().__init__(standby)
        self.resource = "GPU" if device == "cuda" else "CPU"
        self.per_slot = 1.0 / slots_per_gpu if self.resource == "GPU" else 1.0
        self.placement_timeout = placement_timeout
        self._groups_made = 0     # placement-group names must be unique in the cluster
        self.prefix = f"foundry-elastic-{instance}-" if instance else "foundry-elastic-"
        self.slot_limit = slots
        self.held = 0             # slots reserved for replicas
        self.standbys: List[_RayStandby] = []

    def _group_name(self, what: str) -> str:
        self._groups_made += 1
        return f"{self.prefix}{what}-pg{self._groups_made - 1}"

    def new_actor(self, group: Any, slots: int, standby: bool = False) -> Any:
        """An engine actor in ``group`` holding ``slots`` slots (a standby's sees its node's GPUs)."""
        amount = slots * self.per_slot
        opts: Dict[str, Any] = {"num_cpus": amount, "num_gpus": 0} if self.resource == "CPU" else \
            {"num_cpus": 0, "num_gpus": amount}
        if standby and self.resource == "GPU":
            opts["runtime_env"] = {"env_vars": {RAY_NOSET_CUDA_ENV: "1"}}
        return _worker_actor().options(scheduling_strategy=_in_group(group), **opts).remote()

    @staticmethod
    def kill(actor: Any) -> None:
        import ray

        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def _free_slots(self) -> int:
        """Slots neither a replica nor a standby holds: what the cluster has free, within ``slots``."""
        import ray

        try:
            free = int(ray.available_resources().get(self.resource, 0) / self.per_slot + 1e-9)
        except Exception:  # Ray in trouble: nothing is free
            return 0
        if self.slot_limit is not None:
            free = min(free, self.slot_limit - self.held - len(self.standbys))
        return max(0, free)

    def remove_stale_groups(self) -> int:
        """Remove placement groups a previous (crashed) incarnation of this deployment left behind."""
        from ray._raylet import PlacementGroupID
        from ray.util import placement_group_table
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        removed = 0
        for pg_id, info in placement_group_table().items():
            if info.get("name", "").startswith(self.prefix) and info.get("state") != "REMOVED":
                remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
                removed += 1
        if removed:
            log.warning("removed %d placement group(s) left by a previous controller", removed)
        return removed

    def capacity(self) -> Tuple[Optional[int], str]:
        """The cluster's total slots of this backend's resource (None when Ray cannot say), and a description."""
        import ray

        try:
            total = ray.cluster_resources().get(self.resource, 0)
        except Exception:  # Ray in trouble: let the placement itself decide
            return None, "the Ray cluster's size is unknown"
        return int(total / self.per_slot + 1e-9), f"the Ray cluster has {total:g} {self.resource}"

    async def allocate(self, gen_id: int, layout: Layout, spec_for: SpecFactory) -> List[ReplicaHandle]:
        from ray.util.placement_group import placement_group, remove_placement_group

        n = layout.slots_per_replica
        taken = await self._take_standbys(layout)
        amount = n * self.per_slot
        groups: List[List[Any]] = []         # each replica's placement groups
        made: List[Any] = []                 # those reserved here (a standby's own group already is)
        for i in range(layout.replicas):
            if i < len(taken):               # rank 0 on the standby; the other ranks on its node
                bundle = {self.resource: (n - 1) * self.per_slot, f"node:{taken[i].info['node_ip']}": 0.001}
                new = [] if n == 1 else [placement_group([bundle], strategy="STRICT_PACK",
                                                         name=self._group_name(f"g{gen_id}"))]
                groups.append([taken[i].group] + new)
            else:
                new = [placement_group([{self.resource: amount}], strategy="STRICT_PACK",
                                       name=self._group_name(f"g{gen_id}"))]
                groups.append(new)
            made += new
        try:
            await asyncio.wait_for(asyncio.gather(*(g.ready() for g in made)), timeout=self.placement_timeout)
        except Exception as exc:  # timeout or infeasible: give everything back (the standbys to the pool)
            for g in made:
                remove_placement_group(g)
            self.standbys.extend(taken)
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__   # a timeout's text is empty
            raise SlotsUnavailable(f"{layout} needs {layout.replicas} x {n} {self.resource}, not reserved within "
                                   f"{self.placement_timeout:.0f}s ({why}); the Ray cluster has "
                                   f"{self._resources()}") from None
        self.held += layout.slots
        handles: List[ReplicaHandle] = []
        for i, gs in enumerate(groups):
            if i < len(taken):
                handles.append(_RayReplica(self, i, spec_for(i), n, gs, standby=taken[i]))
            else:
                handles.append(_RayReplica(self, i, spec_for(i), n, gs, actor=self.new_actor(gs[0], n)))
        return handles

    async def _take_standbys(self, layout: Layout) -> List[_RayStandby]:
        """The standbys that become rank 0 of ``layout``'s replicas (warm ones first). Standbys not placed yet
        or gone are dropped, and idle ones are stopped where the layout needs their slots."""
        if not self.standbys:
            return []
        await asyncio.gather(*(s.state_now() for s in self.standbys))
        for s in [s for s in self.standbys if s.state() in ("placing", "exited")]:
            self._remove_standby(s)
        usable = [] if self.standby_disabled else sorted(self.standbys, key=lambda s: (not s.ready, s.number))
        taken = usable[:layout.replicas]
        for s in taken:
            self.standbys.remove(s)
        free, need = self._free_slots(), layout.slots - len(taken)
        while self.standbys and free < need:
            self._remove_standby(self.standbys[-1])
            free += 1
        return taken

    def replenish(self, spec: WorkerSpec) -> int:
        """Drop standbys that exited (or were never placed) and start new ones on free slots up to the target;
        returns how many started. Never blocks on Ray: a new standby is placed and warms up in the background."""
        for s in list(self.standbys):
            s.refresh()
            if s.exit_code is not None:
                self._standby_exited(s.pid, f"in {s.name}", s.exit_code, s.warm)
                self._remove_standby(s)
            elif s.info is None and time.monotonic() - s.created > self.placement_timeout:
                log.warning("standby %s was not placed within %.0fs; removing it", s.name, self.placement_timeout)
                self._remove_standby(s)
        if self.standby_disabled:
            for s in list(self.standbys):
                self._remove_standby(s)
            return 0
        from ray.util.placement_group import placement_group

        started = 0
        room = self._free_slots() if len(self.standbys) < self.standby_target else 0
        while len(self.standbys) < self.standby_target and room > 0:
            name = self._group_name("standby")
            group = placement_group([{self.resource: self.per_slot}], strategy="STRICT_PACK", name=name)
            actor = self.new_actor(group, 1, standby=True)
            number = self.standby_started + 1
            s = replace(spec, log_path=spec.log_path.format(slot=name.rsplit("-", 1)[-1], n=number)
                        if spec.log_path else None)
            self.standbys.append(_RayStandby(number, name, group, actor, actor.start_standby.remote(s.to_dict())))
            self.standby_started += 1
            started += 1
            room -= 1
        return started

    def _remove_standby(self, standby: _RayStandby) -> None:
        """Stop a standby and free its slot (its engine exits with its actor)."""
        from ray.util.placement_group import remove_placement_group

        if standby in self.standbys:
            self.standbys.remove(standby)
        self.kill(standby.actor)
        try:
            remove_placement_group(standby.group)
        except Exception as exc:  # Ray in trouble: the group goes with the cluster
            log.warning("could not remove %s: %s", standby.name, _one_line(exc))

    def standby_status(self) -> Dict[str, Any]:
        for s in self.standbys:
            s.refresh()
        return self._standby_summary([{"slot": s.name, "pid": s.pid, "state": s.state(), "coresident": False}
                                      for s in self.standbys])

    def _resources(self) -> str:
        import ray

        try:
            total = ray.cluster_resources().get(self.resource, 0)
            free = ray.available_resources().get(self.resource, 0)
        except Exception as exc:  # Ray itself is in trouble: say so instead
            return f"unknown resources ({type(exc).__name__})"
        return f"{total:g} {self.resource} ({free:g} free)"

    async def shutdown(self) -> None:
        """Stop the standby pool (the replicas are the controller's to stop)."""
        for s in list(self.standbys):
            self._remove_standby(s)
