"""foundry_core's settings: every environment variable it reads, read once, here.

:meth:`Options.from_env` reads them. :class:`~foundry_core.Session` takes an ``Options`` (default:
``Options.from_env()``, read once when the session is made) and hands each step what it needs as parameters;
so do the entry points used without a session (``options=None`` meaning ``Options.from_env()``): the CLI's
``main``, :func:`~foundry_core.preload`, :func:`~foundry_core.ranks.merge_rank_archives`,
:func:`~foundry_core.store.pack_archive`, :class:`~foundry_core.recorder.ImageRecorder` and the native build
(:mod:`foundry_core.native`). Below them nothing reads ``os.environ`` for a setting: what takes a setting as a
parameter defaults to ``Options()``, the values with none of the variables set. Other tools' variables (``CC``,
``CUDA_HOME``/``CUDA_PATH`` for the native build) are read where those tools are looked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from foundry_core.errors import FoundryError

__all__ = ["DEFAULT_ARENA_BASE", "DEFAULT_ARENA_SIZE", "ENV", "MODULE_GLOBALS_POLICIES", "Options",
           "default_cache_dir"]

#: Far from where Linux puts the heap (0x55…), shared libraries and mmaps (0x7f…) and where the CUDA driver
#: usually reserves its own ranges.
DEFAULT_ARENA_BASE = 0x6A00_0000_0000
#: Virtual size only; physical memory is mapped per segment.
DEFAULT_ARENA_SIZE = 1 << 40
#: What SAVE may do about module variables graphs depend on (``foundry_core.modglobals``).
MODULE_GLOBALS_POLICIES = ("warn", "refuse", "off", "relocate")

#: Field -> the environment variable it comes from (the one list of them).
ENV = {
    "cache_dir": "FOUNDRY_CACHE",
    "arena_base": "FOUNDRY_ARENA_BASE",
    "arena_size": "FOUNDRY_ARENA_SIZE",
    "image_store": "FOUNDRY_IMAGE_STORE",
    "allow_foreign_pointers": "FOUNDRY_ALLOW_FOREIGN_POINTERS",
    "snapshot_graph_pool": "FOUNDRY_SNAPSHOT_GRAPH_POOL",
    "module_globals": "FOUNDRY_MODULE_GLOBALS",
    "archive_key": "FOUNDRY_ARCHIVE_KEY",
    "archive_key_file": "FOUNDRY_ARCHIVE_KEY_FILE",
    "inflate_budget": "FOUNDRY_INFLATE_BUDGET",
    "libcupti": "FOUNDRY_LIBCUPTI",
}


def default_cache_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """``$XDG_CACHE_HOME/foundry``, else ``~/.cache/foundry``."""
    env = os.environ if environ is None else environ
    return Path(os.path.join(env.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "foundry"))


@dataclass(frozen=True)
class Options:
    """foundry_core's settings (frozen; ``dataclasses.replace`` makes a changed copy)."""

    #: ``FOUNDRY_CACHE``: where the native helpers are compiled (its ``native/`` subdirectory must be private to
    #: this user). Default: ``$XDG_CACHE_HOME/foundry`` or ``~/.cache/foundry``.
    cache_dir: Path = field(default_factory=default_cache_dir)
    #: ``FOUNDRY_ARENA_BASE``: virtual address of SAVE's arena (an integer; ``0x`` hex allowed). LOAD always uses
    #: the archive's.
    arena_base: int = DEFAULT_ARENA_BASE
    #: ``FOUNDRY_ARENA_SIZE``: bytes of address space SAVE's arena reserves.
    arena_size: int = DEFAULT_ARENA_SIZE
    #: ``FOUNDRY_IMAGE_STORE=1``: SAVE puts kernel images into the store beside the archive instead of embedding
    #: them (``Session(image_store=...)`` wins).
    image_store: bool = False
    #: ``FOUNDRY_ALLOW_FOREIGN_POINTERS=1``: SAVE only warns about graph arguments that point outside the arena,
    #: and LOAD accepts memset/memcpy targets outside it (the same switch on both sides).
    allow_foreign_pointers: bool = False
    #: ``FOUNDRY_SNAPSHOT_GRAPH_POOL=1``: SAVE also snapshots live graph-pool blocks that arguments point into.
    snapshot_graph_pool: bool = False
    #: ``FOUNDRY_MODULE_GLOBALS``: what SAVE does about module variables graphs depend on: warn (default),
    #: refuse, off or relocate (``foundry_core.modglobals``).
    module_globals: str = "warn"
    #: ``FOUNDRY_ARCHIVE_KEY``: the archive signing key (``foundry_core.trust``); None: no key.
    archive_key: Optional[str] = field(default=None, repr=False)
    #: ``FOUNDRY_ARCHIVE_KEY_FILE``: a file holding the key, used when ``archive_key`` is unset.
    archive_key_file: Optional[Path] = None
    #: ``FOUNDRY_INFLATE_BUDGET``: most bytes of one archive's contents LOAD holds decompressed; None: half the
    #: available memory, at most 8 GiB (``foundry_core.decompress``).
    inflate_budget: Optional[int] = None
    #: ``FOUNDRY_LIBCUPTI``: path of the libcupti the image recorder loads; None: searched for.
    libcupti: Optional[str] = None

    def __post_init__(self) -> None:
        if self.module_globals not in MODULE_GLOBALS_POLICIES:
            raise FoundryError(f"{ENV['module_globals']}={self.module_globals!r}: expected one of "
                               f"{', '.join(MODULE_GLOBALS_POLICIES)}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Options":
        """The settings from ``environ`` (default ``os.environ``); FoundryError with one line for a bad value."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(ENV[name], "")

        def number(name: str, default: Optional[int], what: str) -> Optional[int]:
            value = get(name)
            if not value:
                return default
            try:
                return int(value, 0)
            except ValueError:
                raise FoundryError(f"{ENV[name]}={value!r} is not {what}") from None

        return cls(
            cache_dir=Path(get("cache_dir") or default_cache_dir(env)),
            arena_base=number("arena_base", DEFAULT_ARENA_BASE, "an address (e.g. 0x6a0000000000)"),
            arena_size=number("arena_size", DEFAULT_ARENA_SIZE, "a number of bytes"),
            image_store=get("image_store") == "1",
            allow_foreign_pointers=get("allow_foreign_pointers") == "1",
            snapshot_graph_pool=get("snapshot_graph_pool") == "1",
            module_globals=get("module_globals").strip().lower() or "warn",
            archive_key=get("archive_key") or None,
            archive_key_file=Path(get("archive_key_file")) if get("archive_key_file") else None,
            inflate_budget=number("inflate_budget", None, "a number of bytes"),
            libcupti=get("libcupti") or None,
        )
