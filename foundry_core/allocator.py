"""Deterministic device memory: a CUDA VMM arena at a fixed base, handed to PyTorch as memory pools.

``Arena`` wraps ``_native/arena.c``. PyTorch's caching allocator keeps doing the splitting and caching; it asks
the arena for whole segments through ``CUDAPluggableAllocator`` under ``torch.cuda.MemPool``s, so no global
allocator swap and no LD_PRELOAD is needed. Same sequence of segment requests ⇒ same addresses in SAVE and LOAD;
the arena records that sequence (``trace()``) so LOAD can prove it.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Optional

import numpy as np

from foundry_core import native
from foundry_core.errors import ArenaUnavailable
from foundry_core.layout import TRACE_DTYPE
from foundry_core.options import DEFAULT_ARENA_BASE, DEFAULT_ARENA_SIZE, Options

log = logging.getLogger("foundry_core.allocator")


def describe_holder(start: int, end: int, maps: Optional[str] = None) -> str:
    """Name what occupies [start, end) in this process, from /proc/self/maps (or ``maps``, its text)."""
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            maps = ""
    holders = []
    for line in maps.splitlines():
        parts = line.split()
        if not parts:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo < end and hi > start:
            what = parts[5] if len(parts) > 5 else "an anonymous mapping (CUDA's own reservations look so)"
            holders.append(f"{lo:#x}-{hi:#x} {what}")
    if holders:
        return "held by " + "; ".join(holders[:3]) + (" …" if len(holders) > 3 else "")
    return "held by a device-memory reservation in this process (the CUDA driver, another arena or a VMM pool)"


class Arena:
    """The process's deterministic arena on one device, and the PyTorch memory pools that draw from it.

    ``base``/``size``: the reservation (``Options.arena_base``/``arena_size`` for a SAVE, the archive's for a
    LOAD); ``options``: where the native helper is built (``native.native_lib``)."""

    def __init__(self, device: int = 0, base: int = DEFAULT_ARENA_BASE, size: int = DEFAULT_ARENA_SIZE,
                 options: Optional[Options] = None):
        self.device = device
        self.base = base
        self.size = size
        self.lib = native.native_lib(options)
        self._allocators: dict[str, object] = {}

    def reserve(self) -> None:
        got = ctypes.c_uint64(0)
        if self.lib.foundry_arena_init(self.base, self.size, self.device, ctypes.byref(got)) != 0:
            reason = self.lib.foundry_arena_error().decode()
            if got.value:  # the range is taken: say by what
                raise ArenaUnavailable(
                    f"arena range {self.base:#x}-{self.base + self.size:#x} on cuda:{self.device} is not free "
                    f"({describe_holder(self.base, self.base + self.size)}); set FOUNDRY_ARENA_BASE to another "
                    "address (same value for SAVE and LOAD) or free the range"
                )
            raise ArenaUnavailable(f"cannot reserve the arena at {self.base:#x}: {reason}")
        log.info("arena reserved at %#x (+%#x) on cuda:%d", self.base, self.size, self.device)

    # -- PyTorch -------------------------------------------------------------------------------------------------
    #: Pools with their own malloc entry point in arena.c, so the trace records which pool asked.
    POOLS = ("init", "warmup", "graphs")

    def new_pool(self, name: str = ""):
        """A torch.cuda.MemPool whose segments come from this arena; ``name`` is one of POOLS (or "" for none)."""
        import torch

        if name not in self._allocators:
            symbol = f"foundry_arena_malloc_{name}" if name in self.POOLS else "foundry_arena_malloc"
            self._allocators[name] = torch.cuda.memory.CUDAPluggableAllocator(
                self.lib._foundry_path, symbol, "foundry_arena_free"
            )
        return torch.cuda.MemPool(self._allocators[name].allocator())

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def granularity(self) -> int:
        return int(self.lib.foundry_arena_granularity())

    @property
    def cursor(self) -> int:
        return int(self.lib.foundry_arena_cursor())

    def trace_len(self) -> int:
        return int(self.lib.foundry_arena_trace_len())

    def trace(self, start: int = 0, end: Optional[int] = None) -> np.ndarray:
        """Records [start, end) of the allocation trace, as ``layout.TRACE_DTYPE``."""
        end = self.trace_len() if end is None else end
        out = np.zeros(max(end - start, 0), TRACE_DTYPE)
        if len(out):
            got = self.lib.foundry_arena_trace_copy(out.ctypes.data, start, len(out))
            out = out[:got]
        return out

    def advance(self, offset: int) -> None:
        if self.lib.foundry_arena_advance(offset) != 0:
            raise ArenaUnavailable(self.lib.foundry_arena_error().decode())

    def map_raw(self, offset: int, size: int) -> None:
        """Map [base+offset, +size) outside PyTorch (LOAD restores the capture region this way)."""
        if size and self.lib.foundry_arena_map(offset, size) != 0:
            raise ArenaUnavailable(self.lib.foundry_arena_error().decode())
