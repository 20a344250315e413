"""Where one thread spends a short stretch of time: its Python stack, sampled from a second thread.

A LOAD restores every graph in a tenth of a second, and then waits for the engine to ask for the first one; what the
engine does in between is its own code (batch preparation, attention metadata, first kernel launches). The router
samples that stretch with :class:`StackSampler` and logs where the time went, so a start can be explained from its
log without a profiler or a rebuilt engine. Sampling costs the watched thread one short GIL hand-over per sample.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Optional

__all__ = ["StackSampler"]


class StackSampler:
    """Samples thread ``ident``'s innermost frames every ``interval`` seconds from :meth:`start` until :meth:`stop`
    (or ``limit`` seconds, whichever comes first)."""

    def __init__(self, ident: Optional[int] = None, interval: float = 0.005, depth: int = 3, limit: float = 5.0):
        self.ident = threading.get_ident() if ident is None else ident
        self.interval = interval
        self.depth = depth
        self.limit = limit
        self.samples: collections.Counter = collections.Counter()  # innermost frames (a path) -> samples
        self.taken = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = 0.0

    def start(self) -> "StackSampler":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="foundry-stack-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "StackSampler":
        """Stop sampling (idempotent); returns self for :meth:`summary`."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.seconds = time.perf_counter() - self._t0
        return self

    def _run(self) -> None:
        end = self._t0 + self.limit
        while not self._stop.wait(self.interval) and time.perf_counter() < end:
            frame = sys._current_frames().get(self.ident)
            if frame is None:  # the thread is gone
                return
            self.samples[_path(frame, self.depth)] += 1
            self.taken += 1

    def summary(self, top: int = 5) -> str:
        """The ``top`` most sampled paths with their share, innermost frame first (``a < b``: ``a`` called by
        ``b``)."""
        if not self.taken:
            return "no samples"
        parts = [f"{100 * n / self.taken:.0f}% {path}" for path, n in self.samples.most_common(top)]
        return "; ".join(parts)


def _path(frame, depth: int) -> str:
    names = []
    while frame is not None and len(names) < depth:
        code = frame.f_code
        names.append(f"{_short(code.co_filename)}:{code.co_name}")
        frame = frame.f_back
    return " < ".join(names)


def _short(filename: str) -> str:
    """``package/module.py`` of a path (enough to find it; site-packages prefixes say nothing)."""
    head, tail = os.path.split(filename)
    return f"{os.path.basename(head)}/{tail}" if head else tail
