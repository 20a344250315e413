"""SGLang-shaped CUDA-graph backends shared by the built-in engine, the benchmark and the SGLang plugin.

The interface mirrors sglang 0.5.23's ``FullCudaGraphBackend``: ``capture_session(stream)``,
``capture_one(key, forward_fn)`` (two warm-ups, then capture into one shared pool), ``can_run(key)``,
``replay(key)`` and ``cleanup()``. ``TorchGraphBackend`` captures live; ``FoundryGraphBackend`` captures and
records (SAVE) or restores from an archive without running ``forward_fn`` (LOAD).
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Hashable, Optional

import torch

log = logging.getLogger("foundry_sglang.graphs")


def shape_key_name(key: Hashable) -> str:
    """Stable archive name of a shape key (an int batch size, a tuple, or a string)."""
    if isinstance(key, tuple):
        return "decode_" + "_".join(str(k) for k in key)
    if isinstance(key, int):
        return f"decode_bs{key}"
    return str(key)


@contextmanager
def frozen_gc():
    """Freeze the GC during capture like SGLang does (fewer pauses, no collection of capture-time objects)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class TorchGraphBackend:
    """Live capture, as SGLang's FullCudaGraphBackend does it."""

    needs_forward = True  # capture_one runs forward_fn

    def before_allocations(self) -> None:
        """Called by the model runner before weights, KV cache and static buffers are allocated."""

    def __init__(self, warmups: int = 2, barrier: Optional[Callable[[], None]] = None):
        self._graphs: Dict[Hashable, Any] = {}
        self._outputs: Dict[Hashable, Any] = {}
        self._pool = None
        self._stream: Optional[torch.cuda.Stream] = None
        self.warmups = warmups
        self.barrier = barrier or (lambda: None)
        self.capture_seconds = 0.0

    # -- capture --------------------------------------------------------------------------------
    def _new_pool(self):
        return torch.cuda.graph_pool_handle()

    def _new_graph(self):
        return torch.cuda.CUDAGraph()

    @contextmanager
    def capture_session(self, stream: Optional[torch.cuda.Stream] = None):
        if self._pool is None:
            self._pool = self._new_pool()
        self._stream = stream or torch.cuda.Stream()
        t0 = time.perf_counter()
        try:
            with frozen_gc():
                yield
        finally:
            self.capture_seconds += time.perf_counter() - t0
            self._stream = None

    def _warm_up(self, forward_fn: Callable[[], Any]) -> None:
        """SGLang's warm-ups: kernels loaded and one-time setup paid before capture."""
        for _ in range(self.warmups):
            torch.cuda.synchronize()
            self.barrier()
            out = forward_fn()
            del out

    def _graph_context(self, graph):
        return torch.cuda.graph(graph, pool=self._pool, stream=self._stream)

    def _record(self, key: Hashable, graph, out, seconds: float) -> None:
        """Hook for backends that keep what was captured (Foundry SAVE)."""

    def capture_one(self, key: Hashable, forward_fn: Callable[[], Any]) -> None:
        self._warm_up(forward_fn)
        graph = self._new_graph()
        t0 = time.perf_counter()
        with self._graph_context(graph):
            out = forward_fn()
        self._graphs[key] = graph
        self._outputs[key] = out
        self._record(key, graph, out, time.perf_counter() - t0)

    # -- replay ---------------------------------------------------------------------------------
    def can_run(self, key: Hashable) -> bool:
        return key in self._graphs

    def replay(self, key: Hashable) -> Any:
        self._graphs[key].replay()
        return self._outputs[key]

    def cleanup(self) -> None:
        for g in self._graphs.values():
            g.reset()
        self._graphs.clear()
        self._outputs.clear()
        self._pool = None


class FoundryGraphBackend(TorchGraphBackend):
    """SAVE: capture like TorchGraphBackend and record into a foundry_core archive.
    LOAD: restore every graph from the archive; ``capture_one`` then only looks graphs up (no forward, no warm-up).
    Any LOAD problem (arena taken, archive unusable, restore failed) falls back to live capture with one log line;
    only an explicit ``save`` session makes such problems fatal.

    ``before_allocations()`` must run before the application allocates anything the graphs touch: it opens the
    session, which reserves the deterministic arena and routes this thread's allocations into it.
    """

    def __init__(self, session, warmups: int = 2, barrier=None, save_extra: Optional[dict] = None,
                 restore_order: Optional[list] = None):
        super().__init__(warmups, barrier)
        self.session = session
        self.save_extra = save_extra or {}
        self.restore_order = restore_order
        self._restored: Dict[str, Any] = {}
        self.archive_path = None
        self.fallback_reason: Optional[str] = None  # set when graphs are captured live instead of restored
        self.layout_args = None  # EngineArgs of a TP/EP layout restored from a rank template
        self.requested_mode = getattr(session, "requested_mode", None)
        self.template_report = None
        self.slot_filler = None
        self.all_ranks_ok: Callable[[bool], bool] = lambda ok: ok  # set by the model runner (agreement over ranks)

    def prepare_layout(self, args, rank: int) -> None:
        """TP/EP: rank 0 saves the layout's rank template on its GPU when there is none (``auto``) or when asked
        (``save``); the other ranks wait. A failed template save in ``auto`` mode falls back to live capture."""
        if self.layout_args is None:
            return
        from foundry_core.errors import FoundryError

        ok = True
        if rank == 0 and (self.requested_mode == "save" or not self._template_usable()):
            from foundry_sglang.comm_patch.template import save_template

            try:
                if self.session.path.exists():
                    from foundry_core.session import keep_previous

                    keep_previous(self.session.path)
                self.template_report = save_template(args, self.session.path, self.session.key)
                log.info("foundry: saved the tp=%d ep=%d template in %.1f s (%s)", args.tp, args.ep,
                         self.template_report.total_seconds, self.template_report.summary)
            except FoundryError as e:
                if self.requested_mode == "save":
                    raise
                log.warning("foundry: saving the tp=%d ep=%d template failed: %s", args.tp, args.ep, e)
                ok = False
        self.barrier()
        if not self.all_ranks_ok(ok):
            self._fall_back("no rank template for this layout")

    def _template_usable(self) -> bool:
        from foundry_core.archive import Archive
        from foundry_core.errors import FoundryError

        if not self.session.path.exists():
            return False
        try:
            with Archive.open(self.session.path) as a:
                return a.manifest.fingerprint.key == self.session.key and a.manifest.ranks is not None
        except FoundryError:
            return False

    @classmethod
    def from_engine_args(cls, args, rank: int = 0, barrier=None) -> "FoundryGraphBackend":
        """Backend for the built-in engine, keyed by everything that changes the decode graphs. A single-GPU
        layout has its own archive; a TP/EP layout has ONE rank template (no rank in its key or path) that every
        rank restores, saved on one GPU by rank 0 (``foundry_sglang.comm_patch``)."""
        from pathlib import Path

        from foundry_core import Session

        world = args.world_size
        layout = f"tp{args.tp}-ep{args.ep}" + ("-template" if world > 1 else "-rank0")
        graph_args = {
            "model": args.model, "dtype": str(args.dtype), "tp": args.tp, "ep": args.ep,
            "page_size": args.page_size, "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
            "cuda_graph_bs": list(args.graph_batch_sizes()), "num_kv_pages": args.num_kv_pages, "seed": args.seed,
        }
        if world == 1:
            graph_args["rank"] = 0
        key = json.dumps(graph_args, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.model)[:60]
        path = Path(args.foundry_archive) / f"{slug}-{layout}-{digest}.foundry"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Ranks of a TP/EP layout never SAVE in place (their graphs hold live NCCL state): they load the
        # template that prepare_layout() makes sure exists, or capture live.
        mode = args.foundry_mode if world == 1 else "load"
        session = Session(path, mode=mode, key=key, device=args.gpu_of(rank), rank=rank if world > 1 else None)
        backend = cls(session, barrier=barrier)
        backend.layout_args = args if world > 1 else None
        backend.requested_mode = args.foundry_mode
        return backend

    @property
    def needs_forward(self) -> bool:  # type: ignore[override]
        return self.fallback_reason is not None or self.session.mode != "load"

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        log.warning("foundry: %s; capturing the decode graphs live instead", reason)
        self.session.close()  # stop routing into the arena: a live capture uses PyTorch's own graph pool

    @property
    def saved_extra(self) -> dict:
        """LOAD: the ``extra`` dict SAVE stored (e.g. the KV-pool size to force); empty otherwise."""
        if self.fallback_reason is None and self.session.mode == "load" and self.session.archive is not None:
            return dict(self.session.archive.manifest.extra)
        return {}

    def before_allocations(self) -> None:
        from foundry_core.errors import FoundryError

        if self.fallback_reason is not None:
            return
        problem = None
        try:
            self.session.open()
        except FoundryError as e:
            if self.session.requested_mode == "save":
                raise
            problem = f"cannot use {self.session.path}: {e}"
        if not self.all_ranks_ok(problem is None):  # every rank restores, or every rank captures live
            self._fall_back(problem or "another rank cannot use the archive")
            return
        log.info("foundry: session %s (%s)", self.session.mode, self.session.path)

    def _new_pool(self):
        return torch.cuda.graph_pool_handle() if self.fallback_reason else self.session.graph_pool

    def _new_graph(self):
        return torch.cuda.CUDAGraph() if self.fallback_reason else self.session.new_graph()

    def _graph_context(self, graph):
        if self.fallback_reason:
            return super()._graph_context(graph)
        return self.session.graph_capture(graph, self._stream)

    def _record(self, key: Hashable, graph, out, seconds: float) -> None:
        if not self.fallback_reason:
            self.session.add_graph(shape_key_name(key), graph, out, seconds)

    @contextmanager
    def capture_session(self, stream: Optional[torch.cuda.Stream] = None):
        from foundry_core.errors import FoundryError

        if self.fallback_reason is None and self.session.mode == "load":
            t0 = time.perf_counter()
            # Smallest batch sizes first: a fresh server decodes few sequences, and replay of a graph that is
            # not instantiated yet waits for it rather than failing.
            names = [g.key for g in self.session.archive.manifest.graphs if not g.is_child]
            order = [shape_key_name(k) for k in self.restore_order] if self.restore_order else sorted(
                names, key=lambda n: (len(n), n))
            problem = None
            try:
                if self.session.archive.manifest.slots and self.slot_filler is None:
                    from foundry_sglang.comm_patch.nccl import make_slot_filler

                    self.slot_filler = make_slot_filler(self.session.device)
                self._restored = self.session.restore(order=order, slot_filler=self.slot_filler)
            except FoundryError as e:
                problem = f"restoring from {self.session.path} failed: {e}"
            if not self.all_ranks_ok(problem is None):
                self._restored = {}
                self._fall_back(problem or "another rank could not restore its graphs")
            else:
                self.capture_seconds = time.perf_counter() - t0
                yield
                return
        if self.fallback_reason is not None:
            with TorchGraphBackend.capture_session(self, stream):
                yield
            return
        with self.session.capture_phase(), super().capture_session(stream):
            yield
        self.archive_path = self.session.save(self.save_extra)

    def capture_one(self, key: Hashable, forward_fn: Callable[[], Any]) -> None:
        if self.needs_forward:  # SAVE, or live capture after a LOAD problem
            super().capture_one(key, forward_fn)
            return
        name = shape_key_name(key)
        if name not in self._restored:
            from foundry_core.errors import FoundryError

            raise FoundryError(f"archive {self.session.path} has no graph {name!r}")
        graph = self._restored[name]
        self._graphs[key] = graph
        self._outputs[key] = graph.outputs
