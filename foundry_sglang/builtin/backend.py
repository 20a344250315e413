"""The built-in engine's Foundry graph backend: an adapter over :class:`~foundry_sglang.graphs.router.GraphRouter`.

The router decides SAVE (capture and record), LOAD (restore without running ``forward_fn``) or live capture, with
the same fallback policy as the SGLang plugin; this class only captures, in the engine's
:class:`~foundry_sglang.engine.graphs.TorchGraphBackend` way, into the session's pool. A TP/EP layout restores one
rank template (saved on one GPU by :mod:`.template`), its slots filled with the engine's live NCCL communicator
(:mod:`.collectives`).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Optional

import torch

from foundry_core.archive import Archive
from foundry_core.errors import FoundryError
from foundry_core.session import Session, keep_previous
from foundry_sglang.engine.graphs import TorchGraphBackend
from foundry_sglang.graphs.router import GraphRouter, Route, shape_key_name
from foundry_sglang.graphs.settings import FoundryMode

from .collectives import slot_filler
from .keys import ArchiveTarget, archive_target
from .template import save_template

__all__ = ["FoundryGraphBackend", "make_graph_backend"]

log = logging.getLogger("foundry_sglang.builtin")


class FoundryGraphBackend(TorchGraphBackend):
    """The built-in engine's adapter over :class:`GraphRouter` (which decides; this class only captures).

    SAVE: capture like TorchGraphBackend, into the session's graphs and pool, and record into the archive.
    LOAD: restore every graph from the archive; ``capture_one`` then only installs them (no forward, no warm-up).
    Problems follow the router's one fallback policy (live capture with one log line; an explicit ``save``
    raises).

    ``before_allocations()`` must run before the application allocates anything the graphs touch: it opens the
    session, which reserves the deterministic arena and routes this thread's allocations into it.

    ``target``: this rank's :class:`~.keys.ArchiveTarget` (``from_engine_args``), whose ``mode`` the router runs;
    without one (a virtual rank's SAVE) the session's requested mode.
    """

    def __init__(self, session, warmups: int = 2, barrier=None, save_extra: Optional[dict] = None,
                 restore_order: Optional[list] = None, target: Optional[ArchiveTarget] = None):
        self.target = target
        # first: the base class sets all_ranks_ok
        self.router = GraphRouter(session, target.mode if target is not None else session.requested_mode)
        super().__init__(warmups, barrier)
        self.save_extra = save_extra or {}
        self.restore_order = restore_order
        self.archive_path = None
        self._in_session_capture = False  # inside the SAVE capture phase: graphs come from the session
        self._live_pool = None
        self.template_report = None

    @property
    def all_ranks_ok(self) -> Callable[[bool], bool]:
        """Agreement over the ranks (set by the model runner): every rank restores, or every rank goes live."""
        return self.router.agree

    @all_ranks_ok.setter
    def all_ranks_ok(self, agree: Callable[[bool], bool]) -> None:
        self.router.agree = agree

    def prepare_layout(self, args, rank: int) -> None:
        """TP/EP: rank 0 saves the layout's rank template on its GPU when there is none (``auto``) or when asked
        (``save``); the other ranks wait. A failed template save falls back as the requested mode says
        (``FoundryMode.strict``): every rank captures live, or an explicit ``save`` raises."""
        if self.target is None or not self.target.is_template:
            return
        requested = self.target.requested
        ok = True
        if rank == 0 and (requested is FoundryMode.SAVE or not self._template_usable()):
            try:
                if self.session.path.exists():
                    keep_previous(self.session.path)
                self.template_report = save_template(args, self.session.path, self.session.key)
            except FoundryError as e:
                if requested.strict:
                    raise
                log.warning("foundry: saving the tp=%d ep=%d template failed: %s", args.tp, args.ep, e)
                ok = False
        self.barrier()
        if not self.router.agree(ok):
            self.router.fall_back("no rank template for this layout")

    def _template_usable(self) -> bool:
        if not self.session.path.exists():
            return False
        try:
            with Archive.open(self.session.path, self.session.options) as a:
                return a.manifest.fingerprint.key == self.session.key and a.manifest.ranks is not None
        except FoundryError:
            return False

    @property
    def session(self):
        return self.router.session

    @property
    def fallback_reason(self) -> Optional[str]:
        """Why graphs are captured live instead of restored/saved (None: no problem)."""
        return self.router.problem

    @classmethod
    def from_engine_args(cls, args, rank: int = 0, barrier=None) -> "FoundryGraphBackend":
        """Backend for the built-in engine: rank ``rank``'s archive (:func:`~.keys.archive_target`) under the
        archive directory of ``args.foundry``."""
        target = archive_target(args, rank)
        target.path.parent.mkdir(parents=True, exist_ok=True)
        session = Session(target.path, mode=target.session_mode, key=target.key, device=target.device,
                          rank=target.rank)
        return cls(session, barrier=barrier, target=target)

    @property
    def saved_extra(self) -> dict:
        """LOAD: the ``extra`` dict SAVE stored (e.g. the KV-pool size to force); empty otherwise."""
        if self.router.route is Route.LOAD and self.session.archive is not None:
            return dict(self.session.archive.manifest.extra)
        return {}

    def before_allocations(self) -> None:
        self.router.open()

    def _new_pool(self):
        return self.session.graph_pool if self._in_session_capture else torch.cuda.graph_pool_handle()

    def _new_graph(self):
        return self.session.new_graph() if self._in_session_capture else torch.cuda.CUDAGraph()

    def _graph_context(self, graph):
        if self._in_session_capture:
            return self.session.graph_capture(graph, self._stream)
        if self._pool is None:  # a graph the archive lacked, captured live after a LOAD
            self._live_pool = self._live_pool or torch.cuda.graph_pool_handle()
            return torch.cuda.graph(graph, pool=self._live_pool, stream=self._stream)
        return super()._graph_context(graph)

    @contextmanager
    def capture_session(self, stream: Optional[torch.cuda.Stream] = None):
        if self.router.route is Route.LOAD:
            t0 = time.perf_counter()
            # Smallest batch sizes first: a fresh server decodes few sequences, and replay of a graph that is
            # not instantiated yet waits for it rather than failing.
            names = [g.key for g in self.session.archive.manifest.graphs if not g.is_child]
            order = [shape_key_name(k) for k in self.restore_order] if self.restore_order else sorted(
                names, key=lambda n: (len(n), n))
            if self.session.archive.manifest.slots:  # a rank template: its collectives on this rank's NCCL
                self.router.slot_filler = slot_filler(self.session.device)
            self.router.restore(order)
            if self.router.route is Route.LOAD:
                self.capture_seconds = time.perf_counter() - t0
                yield
                return
        if self.router.route is not Route.SAVE:
            with TorchGraphBackend.capture_session(self, stream):
                yield
            return
        with self.session.capture_phase():
            self._in_session_capture = True
            try:
                with super().capture_session(stream):
                    yield
            finally:
                self._in_session_capture = False
        self.archive_path = self.router.save(self.save_extra)

    def capture_one(self, key: Hashable, forward_fn: Callable[[], Any]) -> None:
        def install(graph) -> None:
            self._graphs[key] = graph
            self._outputs[key] = graph.outputs

        self.router.capture_one(shape_key_name(key), install=install,
                                capture=lambda: self._capture(key, forward_fn),
                                capture_live=lambda: self._capture(key, forward_fn))


def make_graph_backend(args, rank: int, barrier: Callable[[], None]) -> Optional[TorchGraphBackend]:
    """The engine's graph-backend factory with Foundry: none on CPU or with --disable-cuda-graph, Foundry's when
    the engine's Foundry settings are enabled, else live capture."""
    if args.disable_cuda_graph or args.resolved_device() != "cuda":
        return None
    if args.foundry.enabled:
        return FoundryGraphBackend.from_engine_args(args, rank=rank, barrier=barrier)
    return TorchGraphBackend(barrier=barrier)
