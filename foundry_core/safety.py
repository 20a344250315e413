"""SAVE-time safety: every argument word a kernel really uses as an address must lie in memory LOAD restores.

Values alone prove nothing (PyTorch kernel arguments carry uninitialised padding, cuBLASLt blobs carry
address-like integers), so each candidate word outside the arena is first put to the driver: words that are not
live device (or device-mapped host) memory are ignored. Words inside the arena need no question: the whole arena
up to the end of the capture region is recreated at LOAD.

A live word outside the arena is then judged by where it sits (``judge``), with the kernel's parameter layout
(``cuFuncGetParamInfo``) and, for PyTorch's own fixed-size argument structs, the struct's ``dims`` field:

* a memset/memcpy address, a whole pointer-sized parameter, or any word inside an aggregate parameter (struct,
  array, ``extra`` blob such as cuBLASLt's) is treated as used: refused;
* the only exception are the unused slots of PyTorch's ``TensorInfo`` and ``OffsetCalculator`` parameters (the
  kernel's name says it takes them; their size fixes the layout; slots at and beyond ``dims`` are never read):
  PyTorch leaves those uninitialised, so they carry stale copies of old pointers. Such words are logged, counted
  and do not block SAVE.

Why not looser: a live foreign address inside a library's argument blob is usually real (workspaces, semaphores,
constants a library allocated itself) — tolerating "aggregate words that are not tensors" would let such graphs
restore to garbage. Why not two captures: only the application can capture, the ``add_graph`` API records one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

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


# -- judging a live foreign word by where it sits ----------------------------------------------------------------
WHOLE_PARAMETER = "a whole pointer-sized parameter"
NODE_ADDRESS = "a memset/memcpy address"
IN_AGGREGATE = "a word inside a struct/array parameter"
PADDING = "an unused slot of a PyTorch TensorInfo/OffsetCalculator parameter (stale padding)"

MAX_DIMS = 25  # MAX_TENSORINFO_DIMS and OffsetCalculator's MAX_DIMS (CUDA builds)


@dataclass(frozen=True)
class Verdict:
    address: int
    node: int
    offset: int  # byte offset of the word in the node's argument buffer
    rule: str  # one of the constants above
    owner: str

    @property
    def refused(self) -> bool:
        return self.rule != PADDING


def whole_word_params(layout: Sequence[tuple[int, int]]) -> frozenset[int]:
    """Offsets of the 8-byte parameters of a kernel parameter layout [(offset, size), ...]."""
    return frozenset(off for off, size in layout if size == 8)


def _i32(args: bytes, at: int) -> int:
    return int.from_bytes(args[at:at + 4], "little", signed=True) if at + 4 <= len(args) else -1


def padding_ranges(kernel: str, layout: Sequence[tuple[int, int]], args: bytes) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi) of ``args`` that are unused slots of PyTorch's fixed-size argument structs:
    ``TensorInfo<T, I>`` {T* data; I sizes[25]; I strides[25]; int dims} (216 or 416 bytes) and
    ``OffsetCalculator<N, I>`` {int dims; IntDivider<I> sizes_[25]; I strides_[25][N]} (304 + 100 N bytes for
    32-bit indices, 208 + 200 N for 64-bit). Only parameters of a kernel whose (mangled) name names the type count."""
    out = []
    tensor_info, offset_calc = "TensorInfo" in kernel, "OffsetCalculator" in kernel
    for off, size in layout:
        if tensor_info and size in (216, 416):
            isz = 4 if size == 216 else 8
            dims = _i32(args, off + 8 + 2 * MAX_DIMS * isz)
            if 1 <= dims <= MAX_DIMS:
                sizes, strides = off + 8, off + 8 + MAX_DIMS * isz
                out += [(sizes + dims * isz, strides), (strides + dims * isz, strides + MAX_DIMS * isz),
                        (off + 12 + 2 * MAX_DIMS * isz, off + size)]
        elif offset_calc:
            for head, divider, isz, step in ((304, 12, 4, 100), (208, 8, 4 * 2, 200)):
                nargs, rest = divmod(size - head, step)
                if rest or not 1 <= nargs <= 16:
                    continue
                dims = _i32(args, off)
                if 0 <= dims <= MAX_DIMS:
                    first = off + head - MAX_DIMS * divider
                    out += [(first + dims * divider, off + head), (off + head + dims * nargs * isz, off + size)]
    return _merged(out)


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def judge(address: int, node: int, offset: int, is_kernel: bool, pointer_params: frozenset[int],
          padding: Sequence[tuple[int, int]], owner: str) -> Verdict:
    """The rule for one live word outside the arena at byte ``offset`` of a node's arguments."""
    if not is_kernel:
        rule = NODE_ADDRESS
    elif offset in pointer_params:
        rule = WHOLE_PARAMETER
    elif any(lo <= offset and offset + 8 <= hi for lo, hi in padding):
        rule = PADDING
    else:
        rule = IN_AGGREGATE
    return Verdict(address, node, offset, rule, owner)


def judge_graph(payload: bytes, spans: Iterable[tuple[int, int, int]], live: dict[int, str],
                kernel_info: Callable[[int, bytes], Optional[tuple[frozenset[int], list[tuple[int, int]]]]]
                ) -> list[Verdict]:
    """Every occurrence of a live foreign word (``live``: address -> owner) in the spans (node, offset, length).
    ``kernel_info(node, args)`` gives a kernel node's (pointer parameters, padding ranges), None for other nodes."""
    if not live:
        return []
    keys = np.fromiter(live, np.uint64, len(live))
    out = []
    for node, off, length in spans:
        words = np.frombuffer(payload, "<u8", count=length // 8, offset=off)
        hits = np.nonzero(np.isin(words, keys))[0].tolist()
        if not hits:
            continue
        info = kernel_info(node, payload[off:off + length])
        params, padding = info if info is not None else (frozenset(), [])
        for k in hits:
            address = int(words[k])
            out.append(judge(address, node, 8 * k, info is not None, params, padding, live[address]))
    return out
