"""foundry_core: save CUDA graphs with their execution context and restore them in a fresh process.

Public API: :class:`Session` (save/load; :class:`SessionMode`; its settings: :class:`Options`, read from the
environment once by ``Options.from_env()``), :class:`RestoredGraph` (what LOAD returns),
:func:`preload` (start LOAD's preparation at process start, before torch is imported; a later ``Session`` adopts
the :class:`EarlyLoad`) and the :class:`FoundryError` hierarchy. ``__version__`` is the package version
(pyproject reads it from here).
"""
from foundry_core.errors import (
    ArchiveError,
    ArenaUnavailable,
    DeviceUnavailable,
    DriverError,
    FoundryError,
    IncompatibleArchive,
    LayoutMismatch,
    NativeBuildError,
    UnsafeAddress,
    UnsupportedGraph,
    UntrustedArchive,
)

__version__ = "0.1.0"

__all__ = [
    "Session",
    "SessionMode",
    "Options",
    "RestoredGraph",
    "preload",
    "EarlyLoad",
    "FoundryError",
    "ArchiveError",
    "ArenaUnavailable",
    "DeviceUnavailable",
    "DriverError",
    "IncompatibleArchive",
    "LayoutMismatch",
    "NativeBuildError",
    "UnsafeAddress",
    "UnsupportedGraph",
    "UntrustedArchive",
    "__version__",
]

# Resolved on first use to keep `import foundry_core` light (the CLI; preload() runs before torch is imported).
_LAZY = {"Session": "foundry_core.session", "SessionMode": "foundry_core.session", "Options": "foundry_core.options",
         "RestoredGraph": "foundry_core.restore", "preload": "foundry_core.early", "EarlyLoad": "foundry_core.early"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'foundry_core' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
