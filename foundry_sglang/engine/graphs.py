"""The built-in engine's CUDA-graph backends: the interface the engine calls, and live capture.

The interface mirrors sglang's ``FullCudaGraphBackend``: ``capture_session(stream)``, ``capture_one(key,
forward_fn)`` (two warm-ups, then capture into one shared pool), ``can_run(key)``, ``replay(key)`` and
``cleanup()``, plus ``before_allocations()`` (called before weights, KV cache and static buffers are allocated).
:class:`TorchGraphBackend` captures live. A graph backend that saves and restores graphs (Foundry's:
``foundry_sglang.builtin``) reaches the engine through a :data:`GraphBackendFactory` passed by whoever starts it;
the engine itself knows no more than this interface.
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Dict, Hashable, Optional, Protocol

import torch

__all__ = ["GraphBackend", "GraphBackendFactory", "TorchGraphBackend", "frozen_gc", "plain_graph_backend"]


class GraphBackend(Protocol):
    """What the model runner calls on its graph backend (the runner sets ``barrier`` and ``all_ranks_ok``)."""

    barrier: Callable[[], None]
    all_ranks_ok: Callable[[bool], bool]

    def prepare_layout(self, args: Any, rank: int) -> None: ...

    def before_allocations(self) -> None: ...

    @property
    def saved_extra(self) -> dict: ...

    @property
    def save_extra(self) -> dict: ...

    def capture_session(self, stream: Optional[torch.cuda.Stream] = None) -> ContextManager[None]: ...

    def capture_one(self, key: Hashable, forward_fn: Callable[[], Any]) -> None: ...

    def can_run(self, key: Hashable) -> bool: ...

    def replay(self, key: Hashable) -> Any: ...

    def cleanup(self) -> None: ...


#: ``factory(args, rank, barrier)``: the graph backend of one rank, or None for eager decode.
GraphBackendFactory = Callable[[Any, int, Callable[[], None]], Optional[GraphBackend]]


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

    def __init__(self, warmups: int = 2, barrier: Optional[Callable[[], None]] = None):
        self._graphs: Dict[Hashable, Any] = {}
        self._outputs: Dict[Hashable, Any] = {}
        self._pool = None
        self._stream: Optional[torch.cuda.Stream] = None
        self.warmups = warmups
        self.barrier = barrier or (lambda: None)
        self.all_ranks_ok: Callable[[bool], bool] = lambda ok: ok
        self.capture_seconds = 0.0
        self.save_extra: dict = {}  # what a SAVE would store beside the graphs (nothing is saved here)

    # -- start-up ---------------------------------------------------------------------------------
    def prepare_layout(self, args: Any, rank: int) -> None:
        """Called once the process group exists, before ``before_allocations`` (nothing to prepare here)."""

    def before_allocations(self) -> None:
        """Called by the model runner before weights, KV cache and static buffers are allocated."""

    @property
    def saved_extra(self) -> dict:
        """What an archive recorded beside the graphs (e.g. the KV-pool size to force); nothing here."""
        return {}

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

    def _capture(self, key: Hashable, forward_fn: Callable[[], Any]) -> tuple[Any, Any, float]:
        """Warm up, capture into a new graph, keep it for replay; returns (graph, outputs, capture seconds)."""
        self._warm_up(forward_fn)
        graph = self._new_graph()
        t0 = time.perf_counter()
        with self._graph_context(graph):
            out = forward_fn()
        self._graphs[key] = graph
        self._outputs[key] = out
        return graph, out, time.perf_counter() - t0

    def capture_one(self, key: Hashable, forward_fn: Callable[[], Any]) -> None:
        self._capture(key, forward_fn)

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




def plain_graph_backend(args: Any, rank: int, barrier: Callable[[], None]) -> Optional[TorchGraphBackend]:
    """The engine's own factory: no graphs on CPU or with --disable-cuda-graph, else live capture."""
    if args.disable_cuda_graph or args.resolved_device() != "cuda":
        return None
    return TorchGraphBackend(barrier=barrier)
