"""zlib data from an archive, decompressed within one memory budget.

Declared sizes are the archive's word only; the budget bounds what believing them costs. The archive
(``archive.Archive``) and the allocation trace (``layout.decode``) both decompress through :func:`inflate`.
"""
from __future__ import annotations

import zlib
from typing import Optional

from foundry_core.errors import ArchiveError

__all__ = ["DEFAULT_INFLATE_BUDGET", "check_inflate_budget", "inflate", "inflate_budget"]

#: Ceiling of :func:`inflate_budget` (real graph tables and snapshots are far smaller; images are stored raw).
DEFAULT_INFLATE_BUDGET = 8 << 30
_CHUNK = 4 << 20


def inflate_budget(configured: Optional[int] = None) -> int:
    """Most bytes of one archive's contents LOAD may hold, decompressed: ``configured``
    (``Options.inflate_budget``), else half the available memory (at most ``DEFAULT_INFLATE_BUDGET``)."""
    if configured is not None:
        return configured
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return DEFAULT_INFLATE_BUDGET
    return min(DEFAULT_INFLATE_BUDGET, available // 2)


def check_inflate_budget(size: int, what: str, budget: int) -> None:
    """ArchiveError unless ``size`` declared uncompressed bytes fit ``budget``."""
    if size > budget:
        raise ArchiveError(f"{what} declares {size} bytes uncompressed, over the decompression budget of {budget} "
                           "bytes (set FOUNDRY_INFLATE_BUDGET to allow more)")


def inflate(stored, size: int, what: str, budget: int, keep: bool = True) -> bytearray:
    """zlib data that must inflate to exactly ``size`` bytes (which must fit ``budget``), decompressed in bounded
    steps straight into the result and never past ``size``; ``keep=False`` only checks (and returns an empty
    bytearray). ``what`` starts every error message."""
    check_inflate_budget(size, what, budget)
    if size < 0:
        raise ArchiveError(f"{what} declares {size} bytes uncompressed (corrupt)")
    out = bytearray(size) if keep else None
    inflater = zlib.decompressobj()
    pending = stored
    total = 0
    try:
        while True:
            chunk = inflater.decompress(pending, min(_CHUNK, size - total + 1))  # one byte past size is enough
            if total + len(chunk) > size:
                total += len(chunk)
                break
            if out is not None:
                out[total : total + len(chunk)] = chunk
            total += len(chunk)
            pending = inflater.unconsumed_tail
            if inflater.eof or not chunk:
                break
    except zlib.error as err:
        raise ArchiveError(f"{what} does not decompress ({err}) (corrupt)") from None
    if total != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise ArchiveError(f"{what} decompresses to a different size than the recorded {size} bytes (corrupt)")
    return out if out is not None else bytearray()
