"""Triton's process-wide cache key, computed on a thread while SGLang loads its model.

The first Triton kernel a process launches pays for ``triton_key()``: a sha256 of Triton's own library
(``libtriton``, about 0.5 GB) and compiler sources, computed once per process and kept by ``functools.lru_cache``.
It is paid even when every kernel is in Triton's disk cache. In an SGLang scheduler the first Triton launch is the
attention back-end's metadata kernel for the first decode batch size, inside the graph phase: under LOAD, where
the restore itself takes about 0.1 s, that hash was most of the phase (0.43-0.48 s of SGLang's preparation of the
first size on an H100 host; the same hash measured 0.43 s on a build machine's core).

Hashing and file reads release the GIL, so a thread started when the plugin opens its archive computes the key
while the main thread loads weights and sizes the KV pool. The graph phase then waits for that thread before
SGLang's first batch size (``functools.lru_cache`` does not stop a second caller from computing the key again),
finds the key cached, and pays only the per-kernel cache lookups. The key is Triton's own function's result; the
thread computes nothing else and touches no CUDA state, so the arena trace and every kernel are unchanged.
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Callable, Optional

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
        try:
            self._key()
        except Exception as err:  # the main thread computes it as before, at its first launch
            self.error = f"{type(err).__name__}: {err}"
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
