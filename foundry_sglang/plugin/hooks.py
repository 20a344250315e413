"""Hook bodies the plugin registers on SGLang 0.5.23 (see ``foundry_sglang.plugin.HOOKS`` for targets and seams).

One :class:`PluginState` per scheduler process holds the ``foundry_core.Session``, its
:class:`~foundry_sglang.graphs.router.GraphRouter` (which decides SAVE / LOAD / live and owns the fallback policy)
and a :class:`CaptureAdapter`, which only translates the router's decisions into the attributes of SGLang's
``FullCudaGraphBackend`` (``_graphs``, ``_outputs``, ``_pool``, ``_capture_stream``, ``_device_module``,
``_tp_group``, ``_precarve``, ``_cuda_graph_runner``), so it is testable on CPU with a stand-in graph object:

* ``save``: two warm-ups and a capture exactly as ``FullCudaGraphBackend.capture_one`` does them, but into a
  graph from ``session.new_graph()`` (kept topology) and the session's graph pool; the router records it. In a
  TP/EP server SGLang's collectives become slots meanwhile (:mod:`.collectives`); once the archive is written,
  the process fills them in its own graphs with its live communicators, as LOAD does.
* ``load``: the router restores once, then ``_graphs[key] = restored``, ``_outputs[key] = restored.outputs``;
  ``forward_fn`` is never run. SGLang's ``replay()`` then calls ``restored.replay()`` unchanged.
* ``live``: SGLang's own ``capture_one`` (after a problem, logged once with the reason by the router).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import foundry_core
from foundry_core.errors import FoundryError
from foundry_core.ranks import merge_rank_archives
from foundry_core.session import SessionMode, keep_previous
from foundry_sglang.comm_patch import SlotFiller
from foundry_sglang.graphs.keys import ArchiveKey, RankLayout
from foundry_sglang.graphs.router import FALLBACK_ERRORS, GraphRouter, Route, one_line, shape_key_name
from foundry_sglang.graphs.settings import FoundryConfig, FoundryMode

from . import collectives, compat
from .flags import UnsafeFlag, check_flags, config_from_env
from .keys import sglang_archive_key
from .parallel import world_size
from .triton_key import TritonKeyWarmup

log = logging.getLogger("foundry_sglang.plugin.hooks")

EXTRA_KV = "sglang.memory_pool_config"
#: GPU memory SAVE's server took from sizing its KV pool to the end of its graphs (pool, buffers, graphs): what a
#: LOAD that forces the same pool needs free at that point, or it runs out of memory.
EXTRA_KV_NEEDS = "sglang.memory_pool_to_graphs_bytes"
EXTRA_KEY = "sglang.key_material"
EXTRA_GRAPHS = "sglang.graphs"


# -- output pytrees --------------------------------------------------------------------------------
def register_dataclass_pytree(cls: type, serialized_name: str) -> bool:
    """Register a dataclass as a torch pytree node whose treespec survives JSON (True if newly registered)."""
    import torch.utils._pytree as pytree

    names = tuple(f.name for f in dataclasses.fields(cls) if f.init)

    def flatten(obj):
        return [getattr(obj, n) for n in names], names

    def unflatten(values, context):
        return cls(**dict(zip(context, values)))

    try:
        pytree.register_pytree_node(
            cls, flatten, unflatten, serialized_type_name=serialized_name,
            to_dumpable_context=list, from_dumpable_context=tuple,
        )
    except ValueError:  # already registered (by us in an earlier call, or by SGLang itself)
        return False
    return True


def register_output_pytrees() -> None:
    """Make SGLang's decode output (LogitsProcessorOutput) storable as a pytree of tensors."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    register_dataclass_pytree(LogitsProcessorOutput, "sglang.srt.layers.logits_processor.LogitsProcessorOutput")


# -- the adapter -----------------------------------------------------------------------------------
class CaptureAdapter:
    """What ``FullCudaGraphBackend.capture_one`` does, as the router decides.

    ``live_capture(backend, shape_key, forward_fn, capture_inputs, post_warmup_hook)`` is SGLang's original
    method; ``capture_scope()`` is SGLang's ``graph_pool_capture_scope`` (injectable for tests).
    """

    def __init__(self, router: GraphRouter, live_capture: Callable[..., None],
                 capture_scope: Callable[[], Any] = contextlib.nullcontext, parallel: bool = False):
        self.router = router
        self.live_capture = live_capture
        self.capture_scope = capture_scope
        self.parallel = parallel  # a TP/EP server: SAVE turns collectives into slots
        self.with_slots: list[tuple[str, Any]] = []  # (name, graph) captured with slots, in capture order

    def capture_one(self, backend: Any, shape_key: Any, forward_fn: Callable[[], Any],
                    capture_inputs: Any = None, post_warmup_hook: Optional[Callable[[], None]] = None) -> None:
        def install(graph: Any) -> None:
            backend._graphs[shape_key] = graph
            backend._outputs[shape_key] = graph.outputs

        name = shape_key_name(shape_key, getattr(backend, "_cuda_graph_runner", None))
        self.router.capture_one(
            name, install=install,
            capture=lambda: self._capture_recording(name, backend, shape_key, forward_fn, post_warmup_hook),
            capture_live=lambda: self.live_capture(backend, shape_key, forward_fn, capture_inputs, post_warmup_hook))

    def _capture_recording(self, name, backend, shape_key, forward_fn, post_warmup_hook) -> tuple[Any, Any, float]:
        if not self.parallel:
            return self._capture(backend, shape_key, forward_fn, post_warmup_hook)
        with collectives.recording(self.router.session):
            graph, out, seconds = self._capture(backend, shape_key, forward_fn, post_warmup_hook)
        self.with_slots.append((name, graph))
        return graph, out, seconds

    def fill_slots(self, filler: Callable) -> int:
        """SAVE of a TP/EP server: give this process's own graphs the collectives their slots stand for (after the
        archive was written; every rank fills the same graphs in the same order)."""
        return sum(self.router.session.fill_captured(graph, filler, name) for name, graph in self.with_slots)

    def _capture(self, backend, shape_key, forward_fn, post_warmup_hook) -> tuple[Any, Any, float]:
        if getattr(backend, "_reuse_output_buffer", False):
            raise FoundryError(
                "foundry: FullCudaGraphBackend with reuse_output_buffer (prefill graphs) is not supported")
        runner = getattr(backend, "_cuda_graph_runner", None)
        profiler = getattr(runner, "_profiler", None) if getattr(runner, "enable_profile_cuda_graph", False) else None
        device = backend._device_module
        for _ in range(2):  # as FullCudaGraphBackend.capture_one: sync, TP barrier, forward, hook
            device.synchronize()
            backend._tp_group.barrier()
            with compat.precarve_measure(backend):
                output = forward_fn()
            del output
            if profiler is not None:
                profiler.step()
            if post_warmup_hook is not None:
                post_warmup_hook()
        session = self.router.session
        graph = session.new_graph()
        with self.capture_scope(), self._graph_ctx(backend, graph):
            compat.precarve_mint(backend)
            out = forward_fn()
        if profiler is not None:
            profiler.step()
        backend._graphs[shape_key] = graph
        backend._outputs[shape_key] = out
        return graph, out, 0.0

    def _graph_ctx(self, backend, graph):
        """The session's capture context (it steps the thread's arena pools aside so the capture allocates from
        the graph pool); SGLang's ``device_module.graph`` into the same pool when the session has none."""
        session_capture = getattr(self.router.session, "graph_capture", None)
        if session_capture is not None:
            return session_capture(graph, stream=backend._capture_stream)
        return backend._device_module.graph(cuda_graph=graph, pool=backend._pool, stream=backend._capture_stream)


# -- per-process state -----------------------------------------------------------------------------
@dataclasses.dataclass
class PluginState:
    """Foundry's state in one scheduler process."""

    session: Any
    router: GraphRouter
    capture: CaptureAdapter
    archive_path: str
    key_material: str
    saved_kv_config: Optional[dict] = None  # LOAD: from the archive
    saved_kv_needs_bytes: Optional[int] = None  # LOAD: EXTRA_KV_NEEDS of the archive
    gpu_to_itself: bool = True  # no other rank of this server on its GPU (their pools would move its free memory)
    kv_config: Optional[dict] = None  # SAVE: what SGLang resolved
    kv_free_bytes: Optional[int] = None  # SAVE: the GPU's free memory when SGLang sized the pool
    kv_forced: bool = False
    parallel: Optional["ParallelArchives"] = None  # a TP/EP server: its template and this rank's part
    triton_key: Optional[TritonKeyWarmup] = None  # Triton's cache key, computed while the model loads


_state: Optional[PluginState] = None


def current_state() -> Optional[PluginState]:
    return _state


def reset_state() -> None:
    global _state
    _state = None


def _archive_extra(session: Any) -> Dict[str, str]:
    """The manifest's ``extra`` of the archive a LOAD session opened."""
    for path in (("extra",), ("manifest", "extra"), ("archive", "manifest", "extra")):
        obj = session
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, dict):
            return obj
    raise FoundryError("foundry_core Session does not expose the archive's extra fields")


def _original(cls: type, name: str) -> Callable:
    """SGLang's own implementation under HookRegistry's wrappers."""
    fn = cls.__dict__[name]
    while getattr(fn, "__code__", None) is not None and "hook_registry" in fn.__code__.co_filename:
        fn = fn.__wrapped__
    return fn


def _rank_layout(runner: Any):
    try:
        from sglang.srt.runtime_context import get_parallel

        p = get_parallel()
    except Exception:
        p = None
    args = runner.server_args

    def pick(*names, default):
        for n in names:
            v = compat.parallel_value(p, n)  # None before SGLang published its parallel config
            if v is not None:
                return v
        return default

    return RankLayout(
        tp_size=pick("tp_size", default=int(getattr(args, "tp_size", 1) or 1)),
        tp_rank=pick("tp_rank", default=0),
        ep_size=pick("moe_ep_size", "ep_size", default=int(getattr(args, "ep_size", 1) or 1)),
        ep_rank=pick("moe_ep_rank", "ep_rank", default=0),
        dp_size=pick("dp_size", "attn_dp_size", default=int(getattr(args, "dp_size", 1) or 1)),
        dp_rank=int(getattr(runner, "dp_rank", None) or pick("dp_rank", "attn_dp_rank", default=0)),
        pp_size=pick("pp_size", default=int(getattr(args, "pp_size", 1) or 1)),
        pp_rank=pick("pp_rank", default=0),
    )


def _resolved_graph_config_problem() -> Optional[str]:
    """Check the cuda-graph config SGLang resolved (auto-disable rules may differ from the raw flags)."""
    try:
        from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend
    except ImportError:
        return None
    if check_cuda_graph_backend(Phase.DECODE, Backend.BREAKABLE):
        return "decode graph backend resolved to 'breakable'; use --cuda-graph-backend-decode full"
    if any(check_cuda_graph_backend(Phase.PREFILL, b) for b in (Backend.FULL, Backend.BREAKABLE)):
        return "prefill CUDA graphs are enabled; add --cuda-graph-backend-prefill disabled"
    return None


@dataclasses.dataclass
class ParallelArchives:
    """A TP/EP server's archives: one rank template for the layout (``foundry_core.ranks``), written by rank 0 from
    every rank's part (a rank whose kernels differ from rank 0's is a variant inside it); the parts stay, as per-rank
    archives, only when the merge fails."""

    template: Path
    rank: int  # this process's rank in SGLang's world group
    world: int  # ranks of the server
    agree: Callable[[bool], bool]

    @property
    def part(self) -> Path:
        return rank_part_path(self.template, self.rank)


def rank_part_path(template: Path, rank: int) -> Path:
    """Where rank ``rank`` of a TP/EP server writes its own archive (``NAME.rankR.foundry``)."""
    return template.with_name(f"{template.stem}.rank{rank}{template.suffix}")


# -- hooks -----------------------------------------------------------------------------------------
def before_model_runner_initialize(runner: Any, *args, **kwargs) -> None:
    """BEFORE ModelRunner.initialize: check flags, key the archive, open the Session (arms the arena)."""
    global _state
    if getattr(runner, "is_draft_worker", False) or _state is not None:
        return None
    config = config_from_env()
    if not config.enabled:
        return None
    reason = check_flags(runner.server_args, config.mode) or _resolved_graph_config_problem()
    if reason:
        if config.mode.strict:
            raise UnsafeFlag(f"--foundry-mode {config.mode} refused: {reason}")
        log.warning("foundry: disabled for this server: %s", reason)
        _stop_early_recorder()
        return None
    # First, so that it overlaps the archive's opening and the weights (triton_key: why, and what it changes).
    triton_key = TritonKeyWarmup.start() if config.early_load else None
    layout = _rank_layout(runner)
    parallel = world_size(runner.server_args) > 1  # the same on every rank, like every decision below
    key = sglang_archive_key(runner.server_args, layout, per_rank=not parallel)
    register_output_pytrees()
    _disable_graph_pool_borrow()
    device = int(runner.gpu_id)
    if parallel:
        archives = ParallelArchives(key.path(config.archive_dir), collectives.world_rank(),
                                    world_size(runner.server_args), collectives.agreement())
        router = _open_parallel(config, key, device, archives)
    else:
        archives, router = None, _open_single(config, key, device)
    if router is None or router.route is not Route.SAVE:  # LOAD needs no recorder; LIVE: SGLang runs as is
        _stop_early_recorder()
    if router is None or router.route is Route.LIVE:
        return None
    from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend

    live = _original(FullCudaGraphBackend, "capture_one")
    saved_kv = saved_needs = None
    if router.route is Route.LOAD:
        problem = None
        try:
            extra = _archive_extra(router.session)
            saved_kv = json.loads(extra[EXTRA_KV])
            saved_needs = int(extra[EXTRA_KV_NEEDS]) if EXTRA_KV_NEEDS in extra else None   # older archives lack it
        except (FoundryError, KeyError, ValueError) as err:
            problem = f"archive has no usable KV-pool configuration ({one_line(err)})"
        if not router.agree(problem is None):
            router.fall_back(problem or "another rank's archive has no usable KV-pool configuration")
            return None
        if parallel:
            router.slot_filler = SlotFiller(collectives.communicators())
    capture = CaptureAdapter(router, live_capture=lambda b, *a: live(b, *a), capture_scope=_graph_pool_capture_scope(),
                             parallel=parallel)
    _state = PluginState(session=router.session, router=router, capture=capture, archive_path=str(router.session.path),
                         key_material=key.material, saved_kv_config=saved_kv, saved_kv_needs_bytes=saved_needs,
                         gpu_to_itself=not (parallel and config.ranks_share_gpu), parallel=archives,
                         triton_key=triton_key)
    log.info("foundry: %s %s (rank %s, pid %d)", router.route.value.upper(), router.session.path, layout.tag(),
             os.getpid())
    return None


def _open_single(config: FoundryConfig, key: ArchiveKey, device: int) -> Optional[GraphRouter]:
    """A single-rank server: its own archive, in the requested mode (``auto`` resolves in ``Session.open``)."""
    path = key.path(config.archive_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        session = foundry_core.Session(str(path), mode=config.mode.session_mode, key=key.key, device=device)
    except FALLBACK_ERRORS as err:
        if config.mode.strict:
            raise
        log.warning("foundry: not used, running plain SGLang: cannot open %s: %s", path, one_line(err))
        return None
    router = GraphRouter(session, config.mode)
    router.open()
    return router


def _open_parallel(config: FoundryConfig, key: ArchiveKey, device: int,
                   archives: ParallelArchives) -> Optional[GraphRouter]:
    """A TP/EP server: every rank loads the layout's template (or, where the ranks could not share one, its own
    part), or every rank saves its part. Each step is agreed, so the ranks always take the same route."""
    agree = archives.agree
    if not agree(_make_parent(archives.template)):
        if config.mode.strict:
            raise FoundryError(f"cannot create the archive directory {archives.template.parent}")
        log.warning("foundry: not used, running plain SGLang: cannot create %s", archives.template.parent)
        return None
    tried = None
    if config.mode is not FoundryMode.SAVE:
        for path, rank in ((archives.template, archives.rank), (archives.part, None)):
            if agree(path.exists()):
                session = foundry_core.Session(str(path), mode=SessionMode.LOAD, key=key.key, device=device, rank=rank)
                tried = _parallel_router(session, config.mode, agree)
                if tried.open() is Route.LOAD:
                    return tried
                break  # an archive every rank has but some rank cannot use: save anew (auto) or serve live
        if config.mode is FoundryMode.LOAD:
            if tried is None:
                log.warning("foundry: no archive for this layout at %s; capturing CUDA graphs live", archives.template)
            return tried
        log.info("foundry: saving a new rank template for this layout: %s", archives.template)
    session = foundry_core.Session(str(archives.part), mode=SessionMode.SAVE, key=key.key, device=device)
    router = _parallel_router(session, config.mode, agree)
    router.open()
    return router


def _parallel_router(session: Any, mode: FoundryMode, agree: Callable[[bool], bool]) -> GraphRouter:
    router = GraphRouter(session, mode)
    router.agree = agree
    return router


def _make_parent(path: Path) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return True


def around_resolve_memory_pool_config(original: Callable, configurator: Any, *args, **kwargs):
    """AROUND KVCacheConfigurator._resolve_memory_pool_config: SAVE records the pool config (and the GPU's free
    memory), LOAD forces the recorded one without profiling, unless this GPU cannot hold it with SAVE's graphs
    now (another process holds its memory): then SGLang sizes its pool and captures live (every rank agrees).
    Ranks sharing one GPU skip that test: what each sees free depends on when the others allocate."""
    state = _state
    if state is None or getattr(configurator, "is_draft_worker", False):
        return original(configurator, *args, **kwargs)
    if state.router.route is Route.LOAD and state.saved_kv_config is not None:
        from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

        config = problem = None
        try:
            config = compat.memory_pool_config(MemoryPoolConfig, state.saved_kv_config)
        except compat.IncompatiblePoolConfig as err:
            problem = str(err)
        if config is not None and state.gpu_to_itself:
            problem = _kv_pool_misfit(state.saved_kv_needs_bytes, _free_gpu_bytes())
        if not state.router.agree(problem is None):   # the ranks take one route (a rank alone would hang)
            state.router.fall_back(problem or "another rank cannot use the saved KV-pool configuration")
            return original(configurator, *args, **kwargs)
        state.kv_forced = True
        log.info("foundry: KV pool forced to the saved configuration: max_total_num_tokens=%s",
                 config.max_total_num_tokens)
        return config
    config = original(configurator, *args, **kwargs)
    if state.router.route is Route.SAVE:
        state.kv_config = dataclasses.asdict(config)
        state.kv_free_bytes = _free_gpu_bytes() if state.gpu_to_itself else None
    return config


def _free_gpu_bytes() -> Optional[int]:
    try:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    except Exception:  # no CUDA here (CPU tests): nothing to compare
        return None


def _kv_pool_misfit(needs: Optional[int], free: Optional[int]) -> Optional[str]:
    """Why SAVE's KV pool must not be forced on this GPU now (None: it fits, or nothing to compare): SAVE's
    server took ``needs`` bytes from sizing its pool to the end of its graphs, and this GPU has less free."""
    if needs is None or free is None or free >= needs:
        return None
    gib = 1 << 30
    return (f"the saved KV pool does not fit: with its graphs it needs {needs / gib:.1f} GiB and this GPU has "
            f"{free / gib:.1f} GiB free (another process holds GPU memory)")


def around_capture_session(original: Callable, backend: Any, stream: Any, *args, **kwargs):
    """AROUND FullCudaGraphBackend.capture_session: SAVE uses the session's graph pool and capture phase; LOAD
    restores here.

    SAVE's arena trace ends where its capture phase begins, at this call. LOAD must compare its trace at the same
    point: between here and the first ``capture_one`` SGLang prepares each batch (``capture_prepare``, the attention
    backend's out-of-graph metadata), and its temporaries would add allocations that SAVE made inside the capture
    phase (measured on the H200: 110 records vs SAVE's 109, a 2 MiB segment, and the LOAD refused). Before SGLang's
    first batch size, every route lets the thread computing Triton's cache key finish (:mod:`.triton_key`)."""
    state = _state
    if state is None:
        return original(backend, stream, *args, **kwargs)
    if state.router.route is Route.LOAD:
        state.router.restore()  # falls back to live capture (route LIVE) on any problem
    _await_triton_key(state)
    if state.router.route is Route.SAVE:
        return _save_capture_session(state, original, backend, stream, *args, **kwargs)
    return original(backend, stream, *args, **kwargs)


def _await_triton_key(state: PluginState) -> None:
    """Before SGLang's first batch size launches its first Triton kernel: let the warm-up thread finish the key."""
    if state.triton_key is not None:
        state.triton_key.wait()
        state.triton_key = None


def around_freeze_gc(original: Callable, enable_cudagraph_gc: bool, *args, **kwargs):
    """AROUND SGLang's ``freeze_gc``, the guard its capture loops run in: a full collection before the captures
    and, when it froze the heap, another after them. A LOAD captures nothing, so neither collection has a job
    there, and each walks the whole scheduler heap (0.39 s for the 0.73 M objects of SGLang's model-runner
    modules alone, measured on a CPU). Every other route gets SGLang's own guard."""
    state = _state
    if state is not None and state.router.route is Route.LOAD:
        return contextlib.nullcontext()
    return original(enable_cudagraph_gc, *args, **kwargs)


@contextlib.contextmanager
def _save_capture_session(state: PluginState, original, backend, stream, *args, **kwargs):
    session = state.session
    if backend._pool is None:
        backend._pool = session.graph_pool
        try:
            from sglang.srt.model_executor.runner_utils.pool import set_global_graph_memory_pool

            set_global_graph_memory_pool(session.graph_pool)
        except ImportError:
            pass
    with session.capture_phase(), original(backend, stream, *args, **kwargs):
        yield


def replace_capture_one(backend: Any, shape_key: Any, forward_fn: Callable[[], Any], capture_inputs: Any = None,
                        post_warmup_hook: Optional[Callable[[], None]] = None) -> None:
    """REPLACE FullCudaGraphBackend.capture_one: route through the process's CaptureAdapter."""
    state = _state
    if state is None:  # Foundry not active in this process (e.g. auto mode refused a flag): SGLang as is
        from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend

        original = _original(FullCudaGraphBackend, "capture_one")
        return original(backend, shape_key, forward_fn, capture_inputs, post_warmup_hook)
    return state.capture.capture_one(backend, shape_key, forward_fn, capture_inputs, post_warmup_hook)


def after_init_cuda_graphs(result: Any, runner: Any, *args, **kwargs) -> Any:
    """AFTER ModelRunner.init_cuda_graphs: SAVE writes the archive (a TP/EP server: every rank its part, then
    rank 0 the layout's template) and fills the slots of its own graphs; both modes log what happened."""
    state = _state
    if state is None or getattr(runner, "is_draft_worker", False):
        return result
    router = state.router
    saving = router.route is Route.SAVE
    written = None
    if saving and router.recorded:
        extra = {EXTRA_KEY: state.key_material, EXTRA_GRAPHS: json.dumps(router.recorded)}
        if state.kv_config is not None:
            extra[EXTRA_KV] = json.dumps(state.kv_config, sort_keys=True)
            free = _free_gpu_bytes() if state.kv_free_bytes is not None else None
            if free is not None:
                extra[EXTRA_KV_NEEDS] = str(max(0, state.kv_free_bytes - free))
        else:
            log.warning("foundry: KV-pool configuration was not observed; the archive will not be loadable")
        written = router.save(extra)
    if state.capture.with_slots:  # the graphs this process serves: their collectives, on its own communicators
        filled = state.capture.fill_slots(SlotFiller(collectives.communicators()))
        log.info("foundry: filled %d collective slots in %d graphs", filled, len(state.capture.with_slots))
    if state.parallel is not None and saving:
        _write_template(state.parallel, written is not None, getattr(router.session, "options", None))
    log.info("foundry: %s", router.summary())
    return result


def _write_template(archives: ParallelArchives, written: bool, options=None) -> None:
    """Rank 0 merges every rank's part into the layout's template once all of them are written (``options``: the
    session's, by which the parts were written and are read and signed); where the merge fails (another arena) the
    parts stay and later starts load them per rank."""
    if archives.agree(written) and archives.rank == 0:
        parts = [rank_part_path(archives.template, r) for r in range(archives.world)]
        try:
            if archives.template.exists():
                keep_previous(archives.template)
            report = merge_rank_archives(parts, archives.template, options=options)
        except FALLBACK_ERRORS as err:
            log.warning("foundry: rank parts kept as per-rank archives (%s)", one_line(err))
        else:
            for part in parts:
                part.unlink(missing_ok=True)
            log.info("foundry: rank template %s written (%s)", archives.template, report.summary())
    collectives.barrier()


def _stop_early_recorder() -> None:
    """Stop the image recorder the entry point started (``plugin.start_image_recorder_early``) when no SAVE
    follows in this process."""
    try:
        from foundry_core.recorder import ImageRecorder

        recorder = ImageRecorder()
        if recorder.active:
            recorder.stop()
    except Exception as err:  # the native helper never built: nothing was started
        log.debug("image recorder not stopped: %s", err)


def _disable_graph_pool_borrow() -> None:
    """Graph-pool borrowing hands free blocks of the graph pool to other users; at LOAD that pool is raw
    restored memory, so turn it off in both modes (allocation order must match)."""
    try:
        from sglang.srt.model_executor.runner_utils.pool import disable_graph_pool_borrow

        disable_graph_pool_borrow("foundry: graph pool is restored from an archive")
    except Exception as err:  # older/newer sglang without the feature, or no runtime context yet
        log.debug("graph pool borrow not disabled: %s", err)


def _graph_pool_capture_scope() -> Callable[[], Any]:
    try:
        from sglang.srt.model_executor.runner_utils.pool import graph_pool_capture_scope

        return graph_pool_capture_scope
    except ImportError:
        return contextlib.nullcontext
