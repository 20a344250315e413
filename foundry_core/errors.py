"""Errors a user can cause. Each carries a one-line message meant to be printed as is."""

__all__ = [
    "FoundryError", "ArchiveError", "IncompatibleArchive", "ArenaUnavailable", "UnsupportedGraph", "UnsafeAddress",
    "DeviceUnavailable", "NativeBuildError", "LayoutMismatch", "UntrustedArchive", "DriverError",
]


class FoundryError(Exception):
    """Base class: a clear, one-line reason. CLIs print ``str(err)`` without a traceback."""


class ArchiveError(FoundryError):
    """The archive is missing, truncated, corrupt or of an unknown schema."""


class IncompatibleArchive(FoundryError):
    """The archive was saved on another GPU/driver/software stack or for another model/config key."""


class ArenaUnavailable(FoundryError):
    """The deterministic arena's address range cannot be reserved in this process."""


class UnsupportedGraph(FoundryError):
    """A captured graph contains something that cannot be restored (refused at SAVE)."""


class UnsafeAddress(FoundryError):
    """A kernel argument points to device memory that LOAD would not restore (refused at SAVE)."""


class DeviceUnavailable(FoundryError):
    """No usable CUDA device (no driver, no GPU, or the requested device index does not exist)."""


class NativeBuildError(FoundryError):
    """The small native helper library could not be compiled or loaded."""


class DriverError(FoundryError):
    """A CUDA driver call failed; ``status`` is the CUresult name ("" when the call could not be made)."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.status = status


class LayoutMismatch(FoundryError):
    """LOAD's arena allocations differ from SAVE's, so the graphs would read the wrong memory (refused at LOAD)."""


class UntrustedArchive(ArchiveError):
    """The archive could have been written by someone else (other users can write it, or its signature is
    missing or wrong). LOAD runs an archive's GPU code, so it loads only archives it can trust."""
