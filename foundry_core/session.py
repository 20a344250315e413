"""``Session``: the public entry point tying arena, kernel images, codec, archive and restore together.

SAVE: ``open()`` starts recording module images (before CUDA work), reserves the arena and routes every
allocation PyTorch makes from then on — any thread, any stream, PyTorch's own included — into it; the application
initialises; ``capture_phase()`` brackets warm-ups and captures; ``save()`` reads the graphs, checks them, and
writes the archive together with the arena's allocation trace.
LOAD: ``open()`` checks the archive against this machine (``opening.open_for_load``, or adopts those checks, and
the kernels, from an early load that ``foundry_core.preload`` started at process start) and reserves the same
arena; the application runs the same initialisation; ``restore()`` compares this process's allocation trace with
SAVE's, maps the capture region, writes back warm-up buffers, loads kernels and rebuilds the graphs — no capture,
no forward pass.
"""
from __future__ import annotations

import atexit
import contextlib
import enum
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from foundry_core import early
from foundry_core.allocator import Arena
from foundry_core.errors import DeviceUnavailable, FoundryError
from foundry_core.layout import live_blocks
from foundry_core.opening import open_for_load
from foundry_core.options import Options
from foundry_core.recorder import ImageRecorder
from foundry_core.restore import Preloader, RestoreInputs, restore_archive
from foundry_core.save import CapturedGraph, SaveInputs, write_archive
from foundry_core.slots import SlotRecorder, fill_captured
from foundry_core.store import ImageStore

__all__ = ["Session", "SessionMode", "keep_previous"]

log = logging.getLogger("foundry_core.session")


class SessionMode(str, enum.Enum):
    """What a session does with its archive (the one definition of these names; engine settings reuse them)."""

    SAVE = "save"  # capture graphs and write the archive
    LOAD = "load"  # restore graphs from the archive
    AUTO = "auto"  # asked for only: open() loads a compatible archive, else saves

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Union[str, "SessionMode"]) -> "SessionMode":
        """``value`` as a mode; FoundryError with one line otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise FoundryError(f"mode must be {', '.join(m.value for m in cls)}, not {value!r}") from None


def keep_previous(path: Path) -> Path:
    """Move an existing archive aside to ``PATH.prev`` (replacing an older ``.prev``); returns the new path."""
    prev = path.with_name(path.name + ".prev")
    os.replace(path, prev)
    log.warning("foundry: kept the previous archive as %s", prev)
    return prev


class Session:
    """Save CUDA graphs with their execution context, or restore them in a fresh process.

    ``mode``: a :class:`SessionMode` or its name: save, load, or auto (load when a compatible archive exists at
    ``path``, else save).
    ``key``: caller's identity of the model/config/layout; LOAD refuses an archive saved under another key.
    ``image_store``: SAVE puts kernel images into the host's store beside the archive (``foundry_core.store``,
    shared by every archive there); False embeds them in the archive file. Default (None): the store when
    ``options.image_store`` (``FOUNDRY_IMAGE_STORE=1``), else embedded — the store has not run on a GPU yet
    (CPU-tested only), so the GPU-proven single-file layout stays the default until it has.
    ``arena_base``/``arena_size``: SAVE's arena (default: ``options``'); LOAD uses the archive's.
    ``options``: foundry_core's settings (:class:`~foundry_core.options.Options`); default
    ``Options.from_env()``, read once here. Every step of the session gets what it needs from them.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mode: Union[str, SessionMode] = SessionMode.AUTO,
        key: str = "",
        device: Optional[int] = None,
        arena_base: Optional[int] = None,
        arena_size: Optional[int] = None,
        progress: bool = True,
        record_images: bool = True,
        rank: Optional[int] = None,
        image_store: Optional[bool] = None,
        options: Optional[Options] = None,
    ):
        self.options = options if options is not None else Options.from_env()
        self.path = Path(path)
        self.requested_mode = SessionMode.parse(mode)
        self.mode: Optional[SessionMode] = None  # SAVE or LOAD once open
        self.key = key
        self.device = device
        self.progress = progress
        self.fallback_reason: Optional[str] = None  # why "auto" chose save
        self.rank = rank  # LOAD of a multi-rank template archive: which rank's delta to apply
        self._slot_recorder = None
        self._arena_args = (self.options.arena_base if arena_base is None else arena_base,
                            self.options.arena_size if arena_size is None else arena_size)
        self._record_images = record_images
        if image_store is None:
            image_store = self.options.image_store
        self.image_store = ImageStore.beside(self.path) if image_store else None
        self.arena: Optional[Arena] = None
        self.archive = None
        self._recorder = None
        self._pools: dict[str, Any] = {}
        self._route: Optional[str] = None  # the arena pool every allocation goes to now
        self._labels: list[tuple[str, int, int]] = []  # (name, first trace record, end) from label()
        self._capture_begin_blocks: set[tuple[int, int]] = set()  # blocks PyTorch allocated inside capture_begin
        self._trace_at_capture: Optional[int] = None
        self._saved_trace = None  # LOAD: SAVE's trace rows (layout.TRACE_DTYPE), decoded at open()
        self._saved_blocks = None  # LOAD: SAVE's live blocks before capture, (offset, size) rows
        self._blocks_at_capture = None  # SAVE: the same, taken when the capture phase began
        self._graphs: list[CapturedGraph] = []
        self._capture_range: Optional[tuple[int, int]] = None
        self._in_capture_phase = False
        self.restore_stats = None
        self._preload = None  # LOAD: kernels and graph tables prepared while the application initialises
        self._early = None  # LOAD: the early load (foundry_core.early) open() adopted
        self._restored = None  # LOAD: restore.Restoration (its builder keeps kernel modules and child graphs alive)
        self.save_stats: dict[str, float] = {}
        self.open_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------------------
    # open / close
    # ------------------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "Session":
        """Decide the mode and arm the session (see the module docstring). LOAD and auto first adopt an early load
        of this archive (``foundry_core.preload``) when one matches; otherwise they open the archive here."""
        if self.mode is not None:
            return self
        t0 = time.perf_counter()
        mode = self.requested_mode
        if mode in (SessionMode.LOAD, SessionMode.AUTO):
            self._early = self._claim_early_load()
            problem = self._adopt(self._early) if self._early is not None else self._open_archive()
            self.open_stats["archive_seconds"] = time.perf_counter() - t0
            if problem:
                if mode is SessionMode.LOAD:
                    raise problem
                self.fallback_reason = str(problem)
                log.info("foundry: no usable archive, capturing and saving (%s)", problem)
                mode = SessionMode.SAVE
            else:
                mode = SessionMode.LOAD
        try:
            self._start(mode)
        except BaseException:
            self.close()  # a failed open leaves nothing armed; open() may be called again
            raise
        self.mode = mode
        # PyTorch aborts at exit if a MemPool dies while still routing allocations: always step out first.
        atexit.register(self.close)
        return self

    def _start(self, mode: SessionMode) -> None:
        """Recorder (SAVE), device, preloader (LOAD), arena and pools; this thread then allocates from the arena."""
        if mode is SessionMode.SAVE and self._record_images:
            self._recorder = ImageRecorder(self.options)
            self._recorder.start()
        import torch

        try:
            if self.device is None:
                self.device = _default_device()
            torch.cuda.set_device(self.device)
        except (RuntimeError, AssertionError) as e:  # torch's own errors: no driver, no GPU, bad index
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DeviceUnavailable(f"no usable CUDA device for foundry: {first}") from None
        base, size = self._arena_args
        if self.archive is not None:  # LOAD: the arena must be where SAVE had it
            base, size = self.archive.manifest.arena.base, self.archive.manifest.arena.size
            if self._early is not None:
                self._preload = self._early.preloader  # kernels loaded (or loading) since process start
            else:
                self._preload = Preloader(self.archive, self.device, self.rank, options=self.options).start()
        t1 = time.perf_counter()
        self.arena = Arena(self.device, base, size, self.options)
        self.arena.reserve()
        for name in ("init", "warmup", "graphs"):
            self._pools[name] = self.arena.new_pool(name)
        self.open_stats["arena_seconds"] = time.perf_counter() - t1
        self._route_to("init")

    def _open_archive(self) -> Optional[FoundryError]:
        """Open and check the archive; return the problem instead of raising (auto mode falls back on it)."""
        opened = open_for_load(self.path, self.key, self.device or 0, self.rank, self.options)
        if opened.problem is None:
            self.archive = opened.archive
            self._saved_trace, self._saved_blocks = opened.saved_trace, opened.saved_blocks
        return opened.problem

    def _claim_early_load(self):
        """The early load (``foundry_core.preload``) started for this archive, key, device, rank and options, if
        any."""
        if not early.started():
            return None
        import torch

        device = self.device if self.device is not None else _default_device()
        return early.claim(self.path, self.key, device, self.rank, (str(torch.__version__), torch.version.cuda or ""),
                           self.options)

    def _adopt(self, loaded: early.EarlyLoad) -> Optional[FoundryError]:
        """Take what an early load found, as ``_open_archive`` would have found it."""
        if loaded.problem is None:
            self.archive, self._saved_trace = loaded.archive, loaded.saved_trace
            self._saved_blocks = loaded.saved_blocks
        log.info("foundry: using the early load of %s (%s)", self.path, loaded.problem or "archive checked")
        self.open_stats["early_load"] = 1.0
        return loaded.problem

    def close(self) -> None:
        """Stop routing allocations to the arena and stop recording images. Graphs, outputs and tensors already
        allocated stay valid."""
        with contextlib.suppress(Exception):
            self._route_to(None)
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None

    # ------------------------------------------------------------------------------------------------------------
    # where allocations go
    # ------------------------------------------------------------------------------------------------------------
    def _route_to(self, name: Optional[str]) -> None:
        """Route every allocation (all threads, all streams) to the arena pool ``name``; None stops routing.
        One route at a time: PyTorch takes the first matching pool, so stacked routes would hide the newer one."""
        import torch

        if self._route is not None:
            pool_id = self._pools[self._route].id
            torch._C._cuda_endAllocateToPool(self.device, pool_id)
            torch._C._cuda_releasePool(self.device, pool_id)
            self._route = None
        if name is not None:
            torch._C._cuda_beginAllocateToPool(self.device, self._pools[name].id)
            self._route = name

    @contextlib.contextmanager
    def label(self, name: str):
        """Name the arena allocations made inside (e.g. "weights", "kv cache"): a LOAD whose layout differs
        from SAVE's then says what the first divergent allocation was."""
        first = self.arena.trace_len() if self.arena is not None else 0
        try:
            yield
        finally:
            if self.arena is not None:
                self._labels.append((name, first, self.arena.trace_len()))

    @property
    def graph_pool(self):
        """Pool id to pass to ``torch.cuda.graph(..., pool=...)``."""
        return self._pools["graphs"].id

    # ------------------------------------------------------------------------------------------------------------
    # SAVE
    # ------------------------------------------------------------------------------------------------------------
    def _require(self, mode: SessionMode) -> None:
        if self.mode is None:
            raise FoundryError("Session.open() must be called first")
        if self.mode != mode:
            raise FoundryError(f"this session is in {self.mode} mode; that call needs {mode} mode")

    @contextlib.contextmanager
    def capture_phase(self):
        """Bracket warm-ups and captures: everything created here lands in the arena's capture region."""
        self._require(SessionMode.SAVE)
        if self._capture_range is not None:
            raise FoundryError("capture_phase() may be entered once per session")
        start = self.arena.cursor
        self._trace_at_capture = self.arena.trace_len()
        self._blocks_at_capture = live_blocks(self._pools["init"], self.arena.base)
        self._route_to("warmup")
        self._in_capture_phase = True
        try:
            yield self
        finally:
            self._in_capture_phase = False
            self._route_to("init")
            self._capture_range = (start, self.arena.cursor)

    def new_graph(self):
        """A ``torch.cuda.CUDAGraph`` that keeps its CUgraph so it can be read at save()."""
        import torch

        return torch.cuda.CUDAGraph(keep_graph=True)

    @contextlib.contextmanager
    def graph_capture(self, graph, stream=None):
        """``torch.cuda.graph`` into the session's graph pool.

        What PyTorch allocates inside ``capture_begin`` (the generator's graph-safe RNG state) still goes to the
        arena (the session's route is active then); once capture has begun, the session's route steps aside until
        the capture ends, so the capture allocates from the graph pool alone.

        Why aside and not behind: PyTorch's routing list was searched oldest-first, then newest-first since
        nested MemPools (pytorch#168382), so re-registering our all-streams route after ``capture_begin`` made it
        win over the capture's own pool on a newest-first PyTorch — the capture then allocated graph outputs in
        the warm-up pool and SAVE snapshotted them (2.4 GiB of logits for the built-in engine, written back on
        LOAD's critical path). Stepping aside is right under either order. The cost: another thread's allocation
        made while a capture runs comes from PyTorch's default pool (SAVE's pointer check refuses a graph that
        reads it). ``tests/gpu/test_capture_pools.py`` shows where a capture's allocations land."""
        import torch

        if not self._in_capture_phase:
            raise FoundryError("graphs must be captured inside Session.capture_phase()")
        route = self._route
        before = _live_blocks(self.device)
        try:
            with torch.cuda.graph(graph, pool=self.graph_pool, stream=stream):
                self._capture_begin_blocks |= _live_blocks(self.device) - before
                self._route_to(None)
                yield
        finally:
            self._route_to(route)

    def capture(self, key: str, fn: Callable[[], Any], warmups: int = 2, stream=None):
        """SGLang-style: ``warmups`` eager runs, then capture ``fn`` and record it under ``key``."""
        import torch

        self._require(SessionMode.SAVE)
        for _ in range(warmups):
            torch.cuda.synchronize()
            out = fn()
            del out
        graph = self.new_graph()
        t0 = time.perf_counter()
        with self.graph_capture(graph, stream):
            out = fn()
        self.add_graph(key, graph, out, time.perf_counter() - t0)
        return graph

    def slot(self, op: str, **fields) -> int:
        """Launch a placeholder for work LOAD must re-create (e.g. a collective) and describe it; see
        ``foundry_core.slots``. ``fields`` are ``schema.SlotSpec`` fields (group, dtype, count, send, recv, ...)."""
        self._require(SessionMode.SAVE)
        if self._slot_recorder is None:
            self._slot_recorder = SlotRecorder()
        return self._slot_recorder.launch(op, **fields)

    def fill_captured(self, graph, filler: Callable, key: str = "") -> int:
        """Give this SAVE process's own ``graph`` the real work of the placeholders captured into it (see
        ``foundry_core.slots.fill_captured``); call after ``save()``. Returns the number of slots filled."""
        self._require(SessionMode.SAVE)
        if self._slot_recorder is None:
            return 0
        return fill_captured(graph, self._slot_recorder, filler, key)

    def add_graph(self, key: str, graph, outputs: Any, capture_seconds: float = 0.0) -> None:
        """Record a captured graph (made by ``new_graph()``) and its outputs for save()."""
        self._require(SessionMode.SAVE)
        if any(g.key == key for g in self._graphs):
            raise FoundryError(f"graph key {key!r} recorded twice")
        self._graphs.append(CapturedGraph(key, graph, outputs, capture_seconds))

    @property
    def captured(self) -> tuple[CapturedGraph, ...]:
        """The graphs recorded so far for save(), in order (key, graph, outputs, capture seconds)."""
        return tuple(self._graphs)

    def save(self, extra: Optional[dict[str, str]] = None) -> Path:
        """Read every recorded graph, check it, and write the archive. Returns the archive path."""
        self._require(SessionMode.SAVE)
        if self._capture_range is None:
            raise FoundryError("save() needs a completed capture_phase()")
        if not self._graphs:
            raise FoundryError("no graphs were captured")
        if self._recorder is None:
            raise FoundryError("save() needs the module-image recorder (Session(record_images=True))")
        if self.fallback_reason and self.path.exists():
            keep_previous(self.path)  # "auto" replaces an unusable archive, but never destroys it
        t0 = time.perf_counter()
        inputs = SaveInputs(
            path=self.path, key=self.key, device=self.device, arena=self.arena, graphs=list(self._graphs),
            images=self._recorder, capture_range=self._capture_range, warmup_pool=self._pools["warmup"],
            trace_at_capture=self._trace_at_capture, blocks_at_capture=self._blocks_at_capture,
            labels=list(self._labels), capture_begin_blocks=frozenset(self._capture_begin_blocks),
            slots=self._slot_recorder, image_store=self.image_store, extra=dict(extra or {}),
            progress=self.progress, graph_pool=self._pools["graphs"], options=self.options)
        path = write_archive(inputs, self.save_stats)
        self.save_stats["write_seconds"] = time.perf_counter() - t0
        self._recorder.stop()  # frees CUPTI for profilers; later module loads are not needed
        self._recorder = None
        return path

    # ------------------------------------------------------------------------------------------------------------
    # LOAD
    # ------------------------------------------------------------------------------------------------------------
    def restore(self, order: Optional[Iterable[str]] = None, background: bool = True,
                slot_filler: Optional[Callable] = None) -> dict[str, Any]:
        """Rebuild all graphs. Returns key -> RestoredGraph. The first graph in ``order`` (default: archive
        order) is ready on return; the rest are instantiated in the background unless ``background=False``.

        ``slot_filler(spec)`` enqueues the real work of each placeholder (``schema.SlotSpec``) on torch's current
        stream; it is required when the archive has slots and is called on this thread, in slot order, before
        ``restore()`` returns."""
        self._require(SessionMode.LOAD)
        inputs = RestoreInputs(archive=self.archive, arena=self.arena, device=self.device,
                               init_pool=self._pools["init"], rank=self.rank, preload=self._preload,
                               saved_trace=self._saved_trace, saved_blocks=self._saved_blocks)
        self._restored = restore_archive(inputs, order, background, slot_filler)
        self.restore_stats = self._restored.stats
        return self._restored.graphs

    def wait_restored(self) -> None:
        """Block until every graph of ``restore()`` is instantiated (the background thread has finished)."""
        if self._restored is not None and self._restored.thread is not None:
            self._restored.thread.join()


def _default_device() -> int:
    """The device a session without one uses: torch's current device once CUDA is initialised, else 0."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def _live_blocks(device: int) -> set[tuple[int, int]]:
    """(address, size) of every allocated block PyTorch's caching allocator holds on ``device``."""
    import torch

    out = set()
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device", device) != device:
            continue
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated":
                out.add((int(blk["address"]), int(blk["size"])))
    return out
