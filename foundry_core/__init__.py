"""foundry_core: save CUDA graphs with their execution context and restore them in a fresh process."""
from foundry_core.errors import (  # noqa: F401
    ArchiveError,
    ArenaUnavailable,
    DeviceUnavailable,
    FoundryError,
    IncompatibleArchive,
    NativeBuildError,
    UnsafeAddress,
    UnsupportedGraph,
)

__version__ = "0.1.0"


def __getattr__(name):  # Session pulls in torch; keep `import foundry_core` light for the CLI.
    if name in ("Session", "RestoredGraph"):
        from foundry_core import session

        return getattr(session, name)
    raise AttributeError(name)
