"""The capture/restore router: one process's SAVE/LOAD decisions and the one fallback policy, for every engine.

An engine adapter (the built-in engine's :class:`~foundry_sglang.builtin.backend.FoundryGraphBackend`, the SGLang
plugin's ``CaptureAdapter``) owns the mechanism: how a graph is captured, into which pool, where outputs go. The
:class:`GraphRouter` owns the decisions, so they are the same everywhere:

* **route**: ``save`` (capture and record), ``load`` (restore, never run the forward) or ``live`` (plain capture);
* **fallback policy**: a problem of the kinds in :data:`FALLBACK_ERRORS` while opening the session, restoring,
  recording or writing the archive makes the process serve live-captured graphs, logged once as one line
  (``foundry: <reason>; capturing CUDA graphs live``). A strict mode (``FoundryMode.strict``: an explicit
  ``save``) raises the same problems instead.
  A graph the archive lacks is captured live (one warning naming it); the other graphs stay restored.
  Opening and LOAD problems also stop routing this thread's allocations into the arena (``session.close()``),
  so a live capture uses the engine's own pool; a SAVE problem happens inside the capture phase and keeps it;
* **names**: :func:`shape_key_name` is the one function from an engine's shape key to an archive graph name;
* **ranks**: in a TP/EP process ``agree(ok)`` (set by the engine: True only if every rank says ok) follows opening
  and restoring, so either every rank restores or every rank captures live — collectives always match;
* **slots**: an archive with communication placeholders (a rank template) is restored with ``slot_filler``, which
  the engine adapter sets (``foundry_sglang.comm_patch.SlotFiller`` over its engine's live communicators); without
  one, such an archive falls back like any other problem.

The router does not capture, warm up or replay anything itself, and knows nothing about CUDA.
"""
from __future__ import annotations

import enum
import logging
import time
from typing import Any, Callable, Hashable, Iterable, Optional, Union

from foundry_core.errors import FoundryError
from foundry_core.session import SessionMode
from foundry_sglang.graphs.settings import FoundryMode
from foundry_sglang.graphs.stack_sampler import StackSampler

__all__ = ["ENGINE_WAIT_MESSAGE", "FALLBACK_ERRORS", "FIRST_INSTALL_MESSAGE", "GraphRouter", "Route", "one_line",
           "shape_key_name"]

log = logging.getLogger("foundry_sglang.graphs")

#: Problems that make a process fall back to live capture (unless ``save`` was asked for explicitly):
#: foundry_core's own errors, file-system errors, CUDA/driver errors (RuntimeError) and undecodable data
#: (ValueError). Anything else is a bug and propagates.
FALLBACK_ERRORS: tuple[type[BaseException], ...] = (FoundryError, OSError, RuntimeError, ValueError)
#: Logged once per LOAD process when the engine asks for its first restored graph: the time between the restore and
#: that moment is the engine's own per-graph preparation, not ours (the SGLang start benchmark reads it).
FIRST_INSTALL_MESSAGE = "foundry: first restored graph (%s) handed to the engine %.3f s after restore() returned"
#: Logged with it: where the engine's thread was in that time (a :class:`StackSampler` summary).
ENGINE_WAIT_MESSAGE = "foundry: until it asked, the engine was in (%d samples): %s"


class Route(str, enum.Enum):
    """What the router does with the next graph: ``save`` or ``load`` — the mode its session resolved to, so the
    values are :class:`~foundry_core.session.SessionMode`'s — or ``live``.

    Why a route is not a mode: ``live`` is nothing one asks for (``off`` means no router at all); it is where a
    process ends up when Foundry cannot save or restore. ``auto`` is asked for but never routed:
    ``Session.open()`` resolves it to save or load before the first graph."""

    SAVE = SessionMode.SAVE.value
    LOAD = SessionMode.LOAD.value
    LIVE = "live"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, mode: Union[str, SessionMode]) -> "Route":
        """The route of an opened session's mode (save or load)."""
        return cls(SessionMode(mode).value)


def shape_key_name(key: Hashable, runner: Any = None) -> str:
    """Archive name of a shape key: an int batch size (``decode_bs8``), a tuple (``decode_8_0``), a string (as
    is), or an SGLang ``ShapeKey`` (``decode_bs8`` plus ``_s<stream>``/``_v<label>``/``_a<variant>`` when set;
    a non-decode ``runner`` replaces the ``decode`` prefix with its class name)."""
    if isinstance(key, bool):
        raise TypeError(f"not a shape key: {key!r}")
    if isinstance(key, int):
        return f"decode_bs{key}"
    if isinstance(key, tuple):
        return "decode_" + "_".join(str(k) for k in key)
    if isinstance(key, str):
        return key
    size = getattr(key, "size", None)
    if size is None:
        return f"decode_{key}"
    prefix = "decode" if runner is None or "Decode" in type(runner).__name__ else type(runner).__name__
    name = f"{prefix}_bs{size}"
    for attr, tag in (("stream_idx", "s"), ("variant_label", "v"), ("attention_variant", "a")):
        value = getattr(key, attr, None)
        if value is not None:
            name += f"_{tag}{value}"
    return name


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class GraphRouter:
    """SAVE/LOAD decisions over one ``foundry_core.Session`` (or an object with its API)."""

    def __init__(self, session: Any, requested: Union[str, FoundryMode]):
        self.session = session
        self.requested = FoundryMode.parse(requested)
        if self.requested is FoundryMode.OFF:
            raise ValueError("a GraphRouter needs an enabled foundry mode (save, load or auto)")
        self.route: Optional[Route] = None  # None until open()
        self.problem: Optional[str] = None  # why this process serves live graphs (None: no problem)
        self.recorded: list[str] = []
        self.restored_names: list[str] = []
        self.live_names: list[str] = []
        self.restore_seconds = 0.0
        self._restored: Optional[dict[str, Any]] = None
        self._restored_at = 0.0  # perf_counter() when restore() returned its graphs
        self._engine_wait: Optional[StackSampler] = None  # where the engine is until it asks for its first graph
        self.agree: Callable[[bool], bool] = lambda ok: ok  # True only if every rank is ok (set by TP/EP engines)
        self.slot_filler: Optional[Callable[[Any], None]] = None  # set by the adapter for archives with slots

    @property
    def strict(self) -> bool:
        """Problems raise instead of falling back: the requested mode's rule (``FoundryMode.strict``)."""
        return self.requested.strict

    # -- policy ----------------------------------------------------------------------------------
    def fall_back(self, reason: str) -> None:
        """Serve live graphs from now on, with one log line saying why."""
        was = self.route
        self.problem = reason
        self.route = Route.LIVE
        log.warning("foundry: %s; capturing CUDA graphs live", reason)
        if self._engine_wait is not None:  # no first restored graph will come
            self._engine_wait.stop()
            self._engine_wait = None
        if was is not Route.SAVE:  # before any capture: let live captures use the engine's own pools
            self.session.close()

    def _problem(self, err: BaseException, reason: str) -> None:
        if self.strict:
            raise err
        self.fall_back(f"{reason}: {one_line(err)}")

    # -- steps -----------------------------------------------------------------------------------
    def open(self) -> Route:
        """Open the session (SAVE arms the recorder and the arena; LOAD checks the archive and maps the arena)."""
        if self.route is not None:
            return self.route
        try:
            self.session.open()
        except FALLBACK_ERRORS as err:
            if not self.agree(False):  # every rank learns it (the strict path below raises on this rank only)
                self._problem(err, f"cannot use {self.session.path}")
            return self.route
        if not self.agree(True):
            self.fall_back("another rank cannot use its archive")
            return self.route
        self.route = Route.of(self.session.mode)
        log.info("foundry: session %s (%s)", self.route, self.session.path)
        return self.route

    def restore(self, order: Optional[Iterable[str]] = None) -> dict[str, Any]:
        """LOAD: rebuild the archive's graphs once (``order``: names to build first); {} after a fallback."""
        if self.route is not Route.LOAD:
            return {}
        if self._restored is None:
            t0 = time.perf_counter()
            problem = None
            try:
                kwargs = {"slot_filler": self.slot_filler} if self.slot_filler is not None else {}
                self._restored = dict(self.session.restore(order=None if order is None else list(order), **kwargs))
            except FALLBACK_ERRORS as err:
                problem = err
            if not self.agree(problem is None):
                self._restored = {}
                if problem is not None:
                    self._problem(problem, f"restoring from {self.session.path} failed")
                else:
                    self.fall_back("another rank could not restore its graphs")
                return {}
            self._restored_at = time.perf_counter()
            self.restore_seconds = self._restored_at - t0
            log.info("foundry: restored %d graphs in %.2f s", len(self._restored), self.restore_seconds)
            if self._restored:
                self._engine_wait = StackSampler().start()
        return self._restored

    def capture_one(self, name: str, *, install: Callable[[Any], None],
                    capture: Callable[[], tuple[Any, Any, float]], capture_live: Callable[[], None]) -> None:
        """Route one graph: LOAD hands the restored graph to ``install``; SAVE runs ``capture`` (warm-ups and a
        capture into the session's graph) and records what it returns, ``(graph, outputs, seconds)``; otherwise,
        or for a graph the archive lacks, ``capture_live``."""
        if self.route is Route.LOAD:
            graph = self.restore().get(name)
            if graph is not None:
                if not self.restored_names:
                    log.info(FIRST_INSTALL_MESSAGE, name, time.perf_counter() - self._restored_at)
                    self._log_engine_wait()
                install(graph)
                self.restored_names.append(name)
                return
            if self.route is Route.LOAD:  # the archive lacks this one graph
                log.warning("foundry: archive %s has no graph %s; capturing it live", self.session.path, name)
                self.session.close()
        if self.route is Route.SAVE:
            try:
                graph, outputs, seconds = capture()
            except FALLBACK_ERRORS as err:  # e.g. a collective no slot can stand for: this graph and the rest live
                self._problem(err, f"SAVE stopped, graph {name} cannot be captured for the archive")
            else:
                self.record(name, graph, outputs, seconds)
                return
        self.live_names.append(name)
        capture_live()

    def _log_engine_wait(self) -> None:
        sampler, self._engine_wait = self._engine_wait, None
        if sampler is not None and sampler.stop().taken:
            log.info(ENGINE_WAIT_MESSAGE, sampler.taken, sampler.summary())

    def record(self, name: str, graph: Any, outputs: Any, seconds: float = 0.0) -> None:
        """SAVE: keep a captured graph for the archive (the graph itself serves this process either way)."""
        try:
            self.session.add_graph(name, graph, outputs, seconds)
        except FALLBACK_ERRORS as err:
            self._problem(err, f"SAVE stopped, graph {name} cannot be saved")
            return
        self.recorded.append(name)

    def save(self, extra: Optional[dict[str, str]] = None) -> Optional[Any]:
        """SAVE: write the archive; returns its path (None when nothing was written)."""
        if self.route is not Route.SAVE or not self.recorded:
            return None
        try:
            path = self.session.save(extra)
        except FALLBACK_ERRORS as err:
            self._problem(err, "archive not written")
            return None
        log.info("foundry: saved %d graphs to %s", len(self.recorded), path)
        return path

    def summary(self) -> str:
        return (f"mode={self.route} recorded={len(self.recorded)} restored={len(self.restored_names)} "
                f"live={len(self.live_names)}" + (f" problem={self.problem}" if self.problem else ""))
