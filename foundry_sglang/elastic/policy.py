"""Optional load policy: reconfigure on queue depth or latency (off unless configured).

Every ``interval`` seconds the policy looks at the router: when requests are queued beyond ``queue_high`` or the
recent median latency exceeds ``latency_high_s`` it submits ``scale_up``; when the load stays below both low
marks for ``cooldown_s`` it submits ``scale_down``. It never submits while a job runs or within ``cooldown_s`` of
its last decision, and an invalid target is logged once and ignored.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

from .controller import Controller, ControllerBusy
from .layout import LayoutError
from .router import Router

log = logging.getLogger("foundry_sglang.elastic.policy")


@dataclass
class PolicyConfig:
    scale_up: Dict[str, int] = field(default_factory=lambda: {"replicas": 2})
    scale_down: Dict[str, int] = field(default_factory=lambda: {"replicas": 1})
    queue_high: int = 8
    latency_high_s: float = 5.0
    queue_low: int = 0
    latency_low_s: float = 0.5
    interval_s: float = 2.0
    cooldown_s: float = 60.0


class LoadPolicy:
    def __init__(self, controller: Controller, router: Router, config: PolicyConfig):
        self.controller, self.router, self.config = controller, router, config
        self._task: Optional[asyncio.Task] = None
        self._last = time.monotonic()
        self.decisions: list = []

    def decide(self) -> Optional[Dict[str, int]]:
        """The layout change the current load calls for, or None."""
        c = self.config
        if self.controller.current_job is not None or time.monotonic() - self._last < c.cooldown_s:
            return None
        lat = self.router.stats.recent_latency[-64:]
        median = statistics.median(lat) if lat else 0.0
        queued = self.router.stats.queued_now
        if queued > c.queue_high or median > c.latency_high_s:
            return c.scale_up
        if queued <= c.queue_low and median < c.latency_low_s:
            return c.scale_down
        return None

    def step(self) -> Optional[str]:
        target = self.decide()
        if target is None:
            return None
        active = self.controller.active
        if active and all(getattr(active.layout, k) == v for k, v in target.items()):
            return None
        self._last = time.monotonic()
        try:
            job = self.controller.submit(dict(target))
        except (LayoutError, ControllerBusy) as exc:
            log.warning("policy target %s not applied: %s", target, exc)
            return None
        log.info("policy: load calls for %s (job %s)", target, job.id)
        self.decisions.append((time.time(), dict(target), job.id))
        return job.id

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            self.step()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()
