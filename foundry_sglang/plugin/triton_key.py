"""Triton's per-process cache key, computed on a thread while SGLang loads its model.

A process's first Triton launch computes ``triton_key()`` (a sha256 of ``libtriton`` and of Triton's compiler
sources, kept by ``functools.lru_cache``), even when every kernel is in Triton's disk cache. In an SGLang
scheduler with the triton attention back-end that launch is the attention metadata of the first decode batch
size, inside the graph phase, where under LOAD it was most of the phase (``docs/BENCHMARKS.md``). Hashing and
file reads release the GIL, so a thread started when the plugin opens its archive computes the key while the main
thread loads weights and sizes the KV pool; the graph phase waits for it before SGLang's first size, since
``lru_cache`` does not stop a second caller from computing the key again. The thread runs Triton's own function
and nothing else: no CUDA, no allocation, so the arena trace and every kernel are unchanged.
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Callable, Optional

from foundry_sglang.graphs.router import one_line

__all__ = ["TritonKeyWarmup", "triton_key_function"]

log = logging.getLogger("foundry_sglang.plugin.triton_key")

#: Where Triton keeps ``triton_key`` (it moved from the compiler to the runtime cache module).
_MODULES = ("triton.runtime.cache", "triton.compiler.compiler")


def triton_key_function() -> Optional[Callable[[], str]]:
    """Triton's cached ``triton_key`` (with ``cache_info``), or None where Triton or the function is missing."""
    for name in _MODULES:
        try:
            fn = getattr(importlib.import_module(name), "triton_key", None)
        except Exception:  # no Triton, or one that fails to import: nothing to warm
            continue
        if callable(fn) and hasattr(fn, "cache_info"):
            return fn
    return None


class TritonKeyWarmup:
    """``triton_key()`` on a daemon thread (:meth:`start`); :meth:`wait` before the first Triton launch."""

    def __init__(self, key_function: Optional[Callable[[], str]]):
        self._key = key_function
        self._done = threading.Event()
        self.seconds: Optional[float] = None  # how long the thread took
        self.error: Optional[str] = None
        self.already_cached = False
        self.ran_on: Optional[str] = None  # the thread that computed the key

    @classmethod
    def start(cls, key_function: Optional[Callable[[], str]] = None) -> "TritonKeyWarmup":
        """Start the thread (a no-op warm-up where Triton has no such function or the key is already cached).
        The import happens here, on the caller's thread, never inside the thread."""
        warmup = cls(key_function or triton_key_function())
        if warmup._key is None or warmup._key.cache_info().currsize:
            warmup.already_cached = warmup._key is not None
            warmup._done.set()
            return warmup
        threading.Thread(target=warmup._run, name="foundry-triton-key", daemon=True).start()
        return warmup

    def _run(self) -> None:
        t = time.perf_counter()
        self.ran_on = threading.current_thread().name
        try:
            self._key()
        except Exception as err:  # the main thread computes it as before, at its first launch
            self.error = one_line(err)
        finally:
            self.seconds = time.perf_counter() - t
            self._done.set()

    def wait(self, timeout: float = 10.0) -> float:
        """Block until the key is computed (at most ``timeout`` s); the seconds waited. Logs what it found."""
        t = time.perf_counter()
        finished = self._done.wait(timeout)
        waited = time.perf_counter() - t
        if not finished:
            log.info("foundry: Triton's cache key not ready after %.1f s; the first kernel launch computes it", waited)
        elif self.error:
            log.info("foundry: Triton's cache key could not be computed early (%s)", self.error)
        elif self.seconds is not None:
            log.info("foundry: Triton's cache key computed on a thread in %.3f s; the graph phase waited %.3f s",
                     self.seconds, waited)
        return waited
