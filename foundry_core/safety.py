"""SAVE-time safety: every argument word that really is a device address must lie in memory LOAD restores.

Values alone prove nothing (PyTorch kernel arguments carry uninitialised padding, cuBLASLt blobs carry
address-like integers), so each candidate word outside the arena is put to the driver: only words the driver
confirms as live device (or device-mapped host) memory are refused. Words inside the arena need no question:
the whole arena up to the end of the capture region is recreated at LOAD, and a stale word pointing elsewhere
in it is never dereferenced by the kernel that carries it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

#: Lowest/highest user-space address worth asking the driver about (x86-64 and aarch64 48-bit VA).
_LO, _HI = 1 << 16, 1 << 48


@dataclass(frozen=True)
class ForeignPointer:
    address: int
    owner: str  # e.g. "device memory 0x7f..+2097152 (not in the Foundry arena)"


def candidate_words(payload: bytes, spans: Iterable[tuple[int, int]], arena_lo: int, arena_hi: int) -> np.ndarray:
    """8-byte-aligned words of the given payload spans that could be addresses outside the arena."""
    words = []
    for off, length in spans:
        n = length // 8
        if n:
            words.append(np.frombuffer(payload, dtype="<u8", count=n, offset=off))
    if not words:
        return np.zeros(0, np.uint64)
    w = np.unique(np.concatenate(words))
    keep = (w >= _LO) & (w < _HI) & ~((w >= arena_lo) & (w < arena_hi))
    return w[keep]


class PointerOracle:
    """Asks the driver whether an address is live memory; caches answers across graphs."""

    def __init__(self, query: Optional[Callable[[int], Optional[str]]] = None):
        self._query = query or _driver_query
        self._cache: dict[int, Optional[str]] = {}

    def owner(self, address: int) -> Optional[str]:
        if address not in self._cache:
            self._cache[address] = self._query(address)
        return self._cache[address]

    def foreign(self, words: np.ndarray) -> list[ForeignPointer]:
        out = []
        for w in words.tolist():
            owner = self.owner(int(w))
            if owner is not None:
                out.append(ForeignPointer(int(w), owner))
        return out


def _driver_query(address: int) -> Optional[str]:
    from cuda.bindings import driver as drv

    attr = drv.CUpointer_attribute
    err, mtype = drv.cuPointerGetAttribute(attr.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, address)
    if int(err) != 0:
        return None
    err1, start = drv.cuPointerGetAttribute(attr.CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, address)
    err2, size = drv.cuPointerGetAttribute(attr.CU_POINTER_ATTRIBUTE_RANGE_SIZE, address)
    kinds = {1: "host memory", 2: "device memory", 3: "array", 4: "managed memory"}
    kind = kinds.get(int(mtype), f"memory type {int(mtype)}")
    if int(err1) == 0 and int(err2) == 0:
        return f"{kind} {int(start):#x}+{int(size)} allocated outside the Foundry arena"
    return f"{kind} allocated outside the Foundry arena"
