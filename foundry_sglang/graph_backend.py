"""SGLang-shaped CUDA-graph backends shared by the built-in engine, the benchmark and the SGLang plugin.

The interface mirrors sglang 0.5.23's ``FullCudaGraphBackend``: ``capture_session(stream)``,
``capture_one(key, forward_fn)`` (two warm-ups, then capture into one shared pool), ``can_run(key)``,
``replay(key)`` and ``cleanup()``. ``TorchGraphBackend`` captures live; ``FoundryGraphBackend`` captures and
records (SAVE) or restores from an archive without running ``forward_fn`` (LOAD).
"""
from __future__ import annotations

import gc
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

    def _record(self, key: Hashable, graph, out) -> None:
        pass

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

    def capture_one(self, key: Hashable, forward_fn: Callable[[], Any]) -> None:
        for _ in range(self.warmups):
            torch.cuda.synchronize()
            self.barrier()
            out = forward_fn()
            del out
        graph = self._new_graph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            out = forward_fn()
        self._graphs[key] = graph
        self._outputs[key] = out
        self._record(key, graph, out)

    # -- replay ---------------------------------------------------------------------------------
    def can_run(self, key: Hashable) -> bool:
        return key in self._graphs

    def keys(self):
        return list(self._graphs)

    def replay(self, key: Hashable) -> Any:
        self._graphs[key].replay()
        return self._outputs[key]

    def cleanup(self) -> None:
        for g in self._graphs.values():
            g.reset()
        self._graphs.clear()
        self._outputs.clear()
        self._pool = None
