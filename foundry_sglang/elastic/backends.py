"""Where workers run: Ray placement groups (production, CPU tests) or plain local processes (no Ray).

Both backends hand the controller ``ReplicaHandle`` objects with the same async methods, so the controller's
state machine does not know which one it drives. ``RayBackend`` reserves one placement group per generation
(one bundle of ``tp * ep`` slots per replica) and hosts each worker in a Ray actor bound to its bundle; the
actor reads its GPU ids from Ray and passes them to the server as ``CUDA_VISIBLE_DEVICES``. ``LocalBackend``
hands out slot ids itself; it exists for machines without Ray (the GPU check carries no 79 MB Ray wheel).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

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


# --------------------------------------------------------------------------------------------- local
class _LocalReplica(ReplicaHandle):
    def __init__(self, backend: "LocalBackend", index: int, spec: WorkerSpec, slots: Sequence[int],
                 standby: Optional[ProcessWorker] = None, spares: Sequence[ProcessWorker] = ()):
        self.backend, self.index, self.spec, self.slots = backend, index, spec, list(slots)
        self.worker = ProcessWorker()
        self.standby = standby          # warm engine on slots[0]: becomes this replica's server (rank 0)
        self.spares = list(spares)      # standbys on this replica's other slots: stopped to free them
        self.from_standby = False
        self._counted = False           # a failed activation is counted once

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

    def describe(self) -> Dict[str, Any]:
        return dict(super().describe(), from_standby=self.from_standby)

    def on_healthy(self) -> None:
        super().on_healthy()
        if self.from_standby:
            self.backend.standby_activation_failures = 0

    async def returncode(self) -> Optional[int]:
        return self.worker.returncode()

    async def stop(self) -> None:
        # Handed its layout, then exited before it ever served: the standby's launch failed. (A replica stopped
        # because a sibling failed or the start timed out is still running here and is not counted.)
        if self.from_standby and not self.healthy and not self._counted and self.worker.returncode() is not None:
            self._counted = True
            self.backend.standby_activation_failed(self.pid)
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        self.backend._give_back(self.slots)
        self.slots = []


class LocalBackend:
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
        self.coreside = coreside
        self.standby_target = max(0, int(standby))
        self.standbys: Dict[int, ProcessWorker] = {}   # slot -> warm engine (its slot is not in self.free)
        self.standby_started = self.standby_used = self.standby_fallbacks = 0
        self.standby_failures = 0                      # standbys in a row that exited before they were warm
        self.standby_activation_failures = 0           # replicas from standbys in a row that never became healthy
        self.standby_activation_failed_total = 0
        self.standby_disabled: Optional[str] = None    # why no more standbys are started or used

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

    def replenish(self, spec: WorkerSpec) -> int:
        """Drop standbys that exited and start new ones on free slots up to the target; returns how many started.
        ``spec`` gives the worker kind, device, environment and log path (``{slot}`` and ``{n}``, the standby's
        number, in it are filled in).
        Once the pool is disabled its idle standbys are stopped."""
        for slot, w in list(self.standbys.items()):
            if w.returncode() is not None:
                self.standby_failures = 0 if w.was_warm() else self.standby_failures + 1
                log.warning("standby pid %s on slot %s exited with status %s%s; replacing it", w.pid, slot,
                            w.returncode(), "" if self.standby_failures == 0 else " before it was warm")
                w.stop()
                self._drop_standby(slot)
        if self.standby_failures >= STANDBY_MAX_FAILURES and not self.standby_disabled:
            self.standby_disabled = (f"{self.standby_failures} standby workers in a row exited before they "
                                     f"were warm (see their logs); no more standby workers")
            log.error("%s", self.standby_disabled)
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
        return {"target": self.standby_target, "ready": sum(w["state"] == "ready" for w in workers),
                "warming": sum(w["state"] == "warming" for w in workers), "workers": workers,
                "started": self.standby_started, "used": self.standby_used, "fallbacks": self.standby_fallbacks,
                "never_healthy": self.standby_activation_failed_total, "disabled": self.standby_disabled,
                "coreside": self.coreside}

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


def ray_gpu_ids(assigned: Sequence[Any]) -> List[str]:
    """Ray's GPU ids for an actor as CUDA_VISIBLE_DEVICES entries: indices, or UUIDs where the node's own
    CUDA_VISIBLE_DEVICES names GPUs by UUID (so never ``int()``)."""
    return [str(g) for g in assigned]


def _worker_actor():
    """The Ray actor class hosting one ProcessWorker (defined lazily: importing ray is slow)."""
    global _worker_actor_cls
    if _worker_actor_cls is None:
        import ray

        @ray.remote
        class EngineWorkerActor:
            def __init__(self) -> None:
                self.worker = ProcessWorker()

            def start(self, spec: Dict[str, Any]) -> Dict[str, Any]:
                s = WorkerSpec(**spec)
                gpu_ids = ray_gpu_ids(ray.get_gpu_ids()) if s.device == "cuda" else []
                ranks = max(s.tp, s.ep)
                if 0 < len(gpu_ids) < ranks:     # a share of fewer GPUs than ranks: the ranks share them
                    gpu_ids = [gpu_ids[r * len(gpu_ids) // ranks] for r in range(ranks)]
                url = self.worker.start(s, gpu_ids=gpu_ids)
                return {"url": url, "pid": self.worker.pid, "gpu_ids": gpu_ids}

            def returncode(self) -> Optional[int]:
                return self.worker.returncode()

            def health(self) -> bool:
                return self.worker.health()

            def stop(self) -> None:
                self.worker.stop()

        _worker_actor_cls = EngineWorkerActor
    return _worker_actor_cls


class _RayReplica(ReplicaHandle):
    def __init__(self, index: int, spec: WorkerSpec, actor: Any, group: Any):
        self.index, self.spec, self.actor, self.group = index, spec, actor, group

    async def start(self) -> str:
        info = await self.actor.start.remote(self.spec.to_dict())
        self.url, self.pid, self.slots = info["url"], info["pid"], info["gpu_ids"]
        return self.url

    async def returncode(self) -> Optional[int]:
        try:
            return await self.actor.returncode.remote()
        except Exception:  # the actor itself died: its server is gone too
            return -1

    async def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            await asyncio.wait_for(self.actor.stop.remote(), timeout=30)
        except Exception as exc:  # best effort; the actor is killed next anyway
            log.warning("replica %d did not stop cleanly: %s", self.index, exc)
        ray.kill(self.actor)
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


class RayBackend:
    """One placement group per replica (a single STRICT_PACK bundle of tp*ep slots), so a generation can
    shrink replica by replica; each replica's worker is an actor bound to its bundle."""

    name = "ray"

    def __init__(self, device: str = "cpu", placement_timeout: float = 60.0, instance: str = "",
                 slots_per_gpu: int = 1):
        """``slots_per_gpu`` > 1: each slot is that share of a GPU (ranks and replicas share GPUs)."""
        self.resource = "GPU" if device == "cuda" else "CPU"
        self.per_slot = 1.0 / slots_per_gpu if self.resource == "GPU" else 1.0
        self.placement_timeout = placement_timeout
        self._groups_made = 0     # placement-group names must be unique in the cluster
        self.prefix = f"foundry-elastic-{instance}-" if instance else "foundry-elastic-"

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
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = layout.slots_per_replica
        first = self._groups_made
        self._groups_made += layout.replicas
        amount = n * self.per_slot
        groups = [placement_group([{self.resource: amount}], strategy="STRICT_PACK",
                                  name=f"{self.prefix}g{gen_id}-pg{first + i}") for i in range(layout.replicas)]
        try:
            await asyncio.wait_for(asyncio.gather(*(g.ready() for g in groups)), timeout=self.placement_timeout)
        except Exception as exc:  # timeout or infeasible: give everything back
            for g in groups:
                remove_placement_group(g)
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__   # a timeout's text is empty
            raise SlotsUnavailable(f"{layout} needs {layout.replicas} x {n} {self.resource}, not reserved within "
                                   f"{self.placement_timeout:.0f}s ({why}); the Ray cluster has "
                                   f"{self._resources()}") from None
        handles: List[ReplicaHandle] = []
        for i, group in enumerate(groups):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0)
            opts = {"num_cpus": n, "num_gpus": 0} if self.resource == "CPU" else {"num_cpus": 0, "num_gpus": amount}
            actor = _worker_actor().options(scheduling_strategy=strategy, **opts).remote()
            handles.append(_RayReplica(i, spec_for(i), actor, group))
        return handles

    def _resources(self) -> str:
        import ray

        try:
            total = ray.cluster_resources().get(self.resource, 0)
            free = ray.available_resources().get(self.resource, 0)
        except Exception as exc:  # Ray itself is in trouble: say so instead
            return f"unknown resources ({type(exc).__name__})"
        return f"{total:g} {self.resource} ({free:g} free)"

    async def shutdown(self) -> None:
        pass
