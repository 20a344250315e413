"""LOAD prepared at process start: everything of LOAD that needs neither the application nor the arena, started
before the application has even imported torch.

A server spends seconds importing its packages and creating its CUDA context before it builds its model; LOAD's
own preparation (open and check the archive, decode the graph tables, load the kernel images) needs none of
that. :func:`preload` starts it on one daemon thread right away; ``Session(path, mode=load|auto).open()`` later
adopts it when it is for the same archive, key, device, rank and options, so the archive is opened once and the
images are loaded once, while the application was importing.

The thread never imports torch (two threads importing one large package take turns on its import lock): it
reads torch's version from ``torch/version.py`` for the fingerprint, brings up the device's primary context
through the driver (the context torch's runtime adopts later) and leaves to ``restore()``'s thread the one check
that needs torch (the graphs' output structures). ``open()`` adopts nothing it cannot vouch for: an early load
for another archive, key, device or rank, for a file that changed since, or computed with other torch versions
than the process imported is left alone, and ``open()`` does the work itself, exactly as without it. What the
thread found wrong is reported by ``open()`` and ``restore()`` with the same errors they raise themselves.

The rest of foundry_core is imported on the thread, not here (deliberately): :func:`preload` returns at once and
the imports overlap the application's own.

Abandoning one is safe: the thread is a daemon, and :meth:`EarlyLoad.discard` unloads what it loaded.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from foundry_core import native
from foundry_core.errors import FoundryError
from foundry_core.options import Options

__all__ = ["EarlyLoad", "claim", "preload"]

log = logging.getLogger("foundry_core.early")

_started: list["EarlyLoad"] = []  # not yet adopted or discarded
_lock = threading.Lock()
_EXIT_WAIT_S = 5.0  # at exit, how long to let a running preparation finish before the driver is torn down


def preload(path: str | os.PathLike, key: str = "", device: int = 0, rank: Optional[int] = None,
            options: Optional[Options] = None) -> "EarlyLoad":
    """Start preparing LOAD of the archive at ``path`` on a background thread; returns at once.

    ``key``, ``device`` (the CUDA ordinal torch will use; CUDA_VISIBLE_DEVICES applies to both), ``rank`` and
    ``options`` (default ``Options.from_env()``) are the ones the application will pass to
    :class:`~foundry_core.Session`; ``Session.open()`` adopts the early load only if all of them and the archive's
    resolved path match. Call it before importing torch."""
    early = EarlyLoad(path, key, device, rank, options if options is not None else Options.from_env())
    with _lock:
        _started.append(early)
    return early.start()


def claim(path: str | os.PathLike, key: str, device: int, rank: Optional[int], torch_versions: tuple[str, str],
          options: Options) -> Optional["EarlyLoad"]:
    """The started early load ``Session.open()`` may adopt for these arguments, waiting for its archive checks;
    None when there is none. ``torch_versions``: (``str(torch.__version__)``, ``torch.version.cuda or ""``) of
    the imported torch. A match that cannot be adopted (the file changed, other torch versions, a failure of the
    early machinery itself) is discarded. A load made under other ``options`` (another key, budget, ...) is not a
    match: its checks are not the session's."""
    with _lock:
        if not _started:
            return None
        wanted = (_resolve(path), key, device, rank, options)
        early = next((e for e in _started if (e.resolved, e.key, e.device, e.rank, e.options) == wanted), None)
        if early is None:
            log.debug("foundry: no early load for %s (key, device, rank or options differ)", path)
            return None
        _started.remove(early)
    why = early.unusable_reason(torch_versions)
    if why:
        log.info("foundry: not using the early load of %s (%s); opening it again", early.path, why)
        early.discard()
        return None
    early.adopted = True
    return early


def started() -> list["EarlyLoad"]:
    """Early loads started in this process and not yet adopted or discarded."""
    with _lock:
        return list(_started)


class EarlyLoad:
    """One archive's LOAD preparation on a background thread (made by :func:`preload`).

    After :meth:`wait_opened`: ``problem`` is the FoundryError ``Session.open()`` would have met (None: the
    archive is open and checked in ``archive``); ``preloader`` holds the kernels and tables ``restore()`` uses.
    ``started_at`` and ``finished_at`` are wall-clock times (``time.time()``), for start-up timelines."""

    def __init__(self, path: str | os.PathLike, key: str, device: int, rank: Optional[int],
                 options: Optional[Options] = None):
        self.path = Path(path)
        self.resolved = _resolve(path)
        self.key, self.device, self.rank = key, device, rank
        self.options = options if options is not None else Options()
        self.archive = None
        self.problem: Optional[FoundryError] = None
        self.failure: Optional[BaseException] = None  # the early machinery itself failed: open() redoes the work
        self.fingerprint = None  # this machine's, as the thread computed it (torch versions from version.py)
        self.saved_trace = self.saved_blocks = None
        self.preloader = None  # restore.Preloader, run on this load's thread
        self.adopted = False
        self.started_at = self.opened_at = self.finished_at = 0.0
        self._identity = None  # of the archive file as opened (open() redoes the work for a replaced or changed file)
        self._retained = None  # the CUdevice whose primary context this load retained (discard() releases it)
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foundry-early-load", daemon=True)

    def timeline(self) -> dict[str, float]:
        """Start-up timeline marks (wall clock): when the early load started and, once done, when it finished."""
        marks = {"early_load_started": self.started_at}
        if self.finished:
            marks["early_load_ready"] = self.finished_at
        return marks

    def start(self) -> "EarlyLoad":
        self.started_at = time.time()
        # The driver reads the module loading mode once, at cuInit, which this thread may now be first to call:
        # keep the mode torch would have given the process (PyTorch releases that set it set LAZY unless the user
        # chose; lazy is also the driver's own default since CUDA 12.2).
        os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
        self._thread.start()
        atexit.register(self._thread.join, _EXIT_WAIT_S)
        return self

    @property
    def finished(self) -> bool:
        return self.finished_at > 0

    def wait_opened(self) -> "EarlyLoad":
        """Block until the archive is open and checked (or found unusable)."""
        self._opened.wait()
        return self

    def wait(self) -> "EarlyLoad":
        """Block until the thread has finished everything it does."""
        self._thread.join()
        return self

    def unusable_reason(self, torch_versions: tuple[str, str]) -> str:
        """Why ``Session.open()`` must not adopt this load ("" when it may)."""
        self.wait_opened()
        if self.failure is not None:
            return f"it failed: {type(self.failure).__name__}: {self.failure}"
        if _identity(self.path) != self._identity:
            return "the file changed since"
        fp = self.fingerprint
        if fp is not None and (fp.torch, fp.cuda_runtime) != tuple(torch_versions):
            return f"it read torch {fp.torch} (CUDA {fp.cuda_runtime}); this process runs {tuple(torch_versions)}"
        return ""

    def discard(self) -> None:
        """Give up this load: wait for its thread, unload its kernels, release the device context it retained,
        close the archive. Nothing happens to a load a session has adopted."""
        if self.adopted:
            return
        with _lock:
            if self in _started:
                _started.remove(self)
        self.wait()
        if self.preloader is not None:
            self.preloader.unload()
            self.preloader = None
        if self._retained is not None:
            drv = native.driver()
            try:
                native.call("cuDevicePrimaryCtxRelease", drv.cuDevicePrimaryCtxRelease, self._retained)
            except FoundryError as e:
                log.warning("foundry: %s", e)
            self._retained = None
        if self.archive is not None:
            self.archive.close()
            self.archive = None

    # -- the thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._open()
        finally:
            self.opened_at = time.time()
            self._opened.set()
        try:
            if self.preloader is not None:
                self.preloader.run()  # its errors wait in the preloader for restore()
                self._warm_native_helper()
        finally:
            self.finished_at = time.time()
            log.debug("foundry: early load of %s finished in %.3f s", self.path, self.finished_at - self.started_at)

    def _open(self) -> None:
        """What ``Session.open()`` does first (``opening.open_for_load``), with torch's versions read from its
        files; on success, the preloader that is to run next."""
        try:
            from foundry_core import fingerprint
            from foundry_core.opening import open_for_load
            from foundry_core.restore import Preloader

            versions = fingerprint.installed_torch_versions()
            if versions is None:
                raise RuntimeError("cannot read torch's version without importing it")
            self._identity = _identity(self.path)
            opened = open_for_load(self.path, self.key, self.device, self.rank, self.options, versions)
            self.archive, self.problem, self.fingerprint = opened.archive, opened.problem, opened.fingerprint
            self.saved_trace, self.saved_blocks = opened.saved_trace, opened.saved_blocks
            if self.archive is not None:
                self._identity = _identity_of(self.archive.file_stat)
                self.preloader = Preloader(self.archive, self.device, self.rank, bind=self._bind_primary_context,
                                          options=self.options)
        except BaseException as e:  # not an archive problem: open() does the work itself
            self.failure = e

    def _bind_primary_context(self, device: int) -> None:
        """Make the device's primary context current on this thread through the driver (no torch): it is the
        context torch's runtime uses for the same device, so what is loaded into it now serves torch later."""
        drv = native.driver()
        native.call("cuInit", drv.cuInit, 0)
        dev = native.call("cuDeviceGet", drv.cuDeviceGet, device)
        ctx = native.call("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain, dev)
        self._retained = dev
        native.call("cuCtxSetCurrent", drv.cuCtxSetCurrent, ctx)

    def _warm_native_helper(self) -> None:
        """Load (and on a first run build) the native helper that the arena and restore() use."""
        try:
            native.native_lib(self.options)
        except Exception as e:  # a warm-up only: the arena reports the problem where it needs the helper
            log.debug("foundry: native helper not ready early: %s", e)

    def __repr__(self) -> str:
        return (f"EarlyLoad({str(self.path)!r}, key={self.key!r}, device={self.device}, rank={self.rank}, "
                f"adopted={self.adopted})")


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _identity(path: Path):
    try:
        return _identity_of(os.stat(path))
    except OSError:
        return None


def _identity_of(st: os.stat_result) -> tuple:
    """Which file, in which state: an in-place write changes the ctime even when the mtime is put back (the ctime
    cannot be set), a replacement changes the inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
