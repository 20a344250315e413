"""The plugin against the real sglang 0.5.23: entry-point discovery, hooks on the real classes, SAVE/LOAD routing.

GPU objects are replaced by the CPU stand-ins of tests/plugin_standins.py; SGLang's classes and its own
replay() are the real ones.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sglang.srt.plugins")

from plugin_standins import CpuStandInDevice, CpuStandInGraph, CpuStandInSession

from foundry_sglang import plugin
from foundry_sglang.graphs import GraphRouter
from foundry_sglang.graphs.router import shape_key_name
from foundry_sglang.plugin import hooks


@pytest.fixture()
def loaded_plugin(monkeypatch, tmp_path):
    """Run SGLang's own load_plugins() with Foundry enabled; undo everything afterwards."""
    import sglang.srt.plugins as sp

    monkeypatch.setenv("FOUNDRY_MODE", "auto")
    monkeypatch.setenv("FOUNDRY_ARCHIVE", str(tmp_path))
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.setattr(sp, "_plugins_loaded", False)
    originals = _current_functions()
    sp.load_plugins()
    yield originals
    plugin.unregister()


def _current_functions():
    import pkgutil

    out = {}
    for target, *_ in plugin.HOOKS:
        owner, attr = target.rsplit(".", 1)
        out[target] = pkgutil.resolve_name(owner).__dict__[attr]
    return out


def test_entry_point_is_discovered_by_sglang():
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert "foundry" in found
    assert found["foundry"][0] is plugin.register


def test_hooks_attach_to_real_classes_and_unregister_restores(loaded_plugin):
    originals = loaded_plugin
    now = _current_functions()
    for target, _type, fn_name, _why in plugin.HOOKS:
        assert now[target] is not originals[target], f"{target} not patched"
        inner = now[target]
        while plugin._is_registry_wrapper(inner):
            inner = inner.__wrapped__
        assert inner is originals[target]
    plugin.unregister()
    assert _current_functions() == originals


def test_plugin_off_registers_nothing(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.delenv("FOUNDRY_ARCHIVE", raising=False)
    monkeypatch.setenv("FOUNDRY_MODE", "off")
    before = {k: list(v) for k, v in HookRegistry._hooks.items()}
    plugin.register()
    assert {k: list(v) for k, v in HookRegistry._hooks.items()} == before


# -- routing through the real FullCudaGraphBackend -------------------------------------------------
class StandInDecodeRunner:
    """Stands in for DecodeCudaGraphRunner (the backend only reads a few attributes of it)."""

    enable_profile_cuda_graph = False


class _Barrier:
    def __init__(self):
        self.calls = 0

    def barrier(self):
        self.calls += 1


class _Precarve:
    @staticmethod
    def measure():
        import contextlib

        return contextlib.nullcontext()

    def mint(self):
        pass


def make_backend():
    """A real FullCudaGraphBackend instance whose device objects are CPU stand-ins."""
    from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend

    b = object.__new__(FullCudaGraphBackend)
    b._graphs, b._outputs, b._pool, b._capture_stream = {}, {}, None, "stream"
    b._cuda_graph_runner = StandInDecodeRunner()
    b._device_module = CpuStandInDevice()
    b._tp_group = _Barrier()
    b._precarve = _Precarve()
    b._reuse_output_buffer = False
    b._output_buffer = None
    return b


def shape_key(bs):
    from sglang.srt.model_executor.runner.shape_key import ShapeKey

    return ShapeKey(size=bs)


def forward_for(bs, calls):
    def forward():
        calls.append(bs)
        return torch.arange(bs, dtype=torch.float32) * 10 + bs
    return forward


def install_state(session, mode):
    from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend

    live = hooks._original(FullCudaGraphBackend, "capture_one")
    router = GraphRouter(session, mode)
    router.open()
    capture = hooks.CaptureAdapter(router, live_capture=lambda b, *a: live(b, *a))
    hooks._state = hooks.PluginState(session=session, router=router, capture=capture, archive_path=session.path,
                                     key_material='{"k":1}', saved_kv_config=session.extra.get(hooks.EXTRA_KV)
                                     and json.loads(session.extra[hooks.EXTRA_KV]))
    return hooks._state


def _save_run(tmp_path, sizes=(8, 4, 1)):
    session = CpuStandInSession(tmp_path / "a.foundry", "auto", key="k1")
    session.open()
    assert session.mode == "save"
    state = install_state(session, "save")
    backend, calls = make_backend(), []
    with backend.capture_session("stream"):
        for bs in sizes:
            backend.capture_one(shape_key(bs), forward_for(bs, calls))
    hooks.after_init_cuda_graphs(None, StandInDecodeRunner())
    return state, backend, calls


def _reopen(tmp_path, mode="auto"):
    """A fresh plugin state and a session opened on the archive ``_save_run`` wrote (as the next server start)."""
    hooks.reset_state()
    session = CpuStandInSession(tmp_path / "a.foundry", mode, key="k1")
    session.open()
    return session


def test_save_captures_records_and_writes(loaded_plugin, tmp_path):
    state, backend, calls = _save_run(tmp_path)
    assert calls == [8, 8, 8, 4, 4, 4, 1, 1, 1]  # two warm-ups + capture per size
    assert state.router.recorded == ["decode_bs8", "decode_bs4", "decode_bs1"]
    assert state.session.capture_phases == 1 and backend._pool == state.session.graph_pool
    assert all(isinstance(g, CpuStandInGraph) for g in backend._graphs.values())
    assert backend._device_module.captures[0][1] == state.session.graph_pool
    saved = json.load(open(state.session.path))
    assert saved["extra"][hooks.EXTRA_KEY] == '{"k":1}'
    assert json.loads(saved["extra"][hooks.EXTRA_GRAPHS]) == ["decode_bs8", "decode_bs4", "decode_bs1"]


def test_load_restores_without_forward_and_sglang_replay_is_untouched(loaded_plugin, tmp_path):
    _save_run(tmp_path)
    session = _reopen(tmp_path)
    assert session.mode == "load"
    state = install_state(session, "load")
    backend, calls = make_backend(), []
    with backend.capture_session("stream"):
        for bs in (8, 4, 1):
            backend.capture_one(shape_key(bs), forward_for(bs, calls))
    assert calls == [] and state.router.restored_names == ["decode_bs8", "decode_bs4", "decode_bs1"]
    assert session.capture_phases == 0
    out = backend.replay(shape_key(4), static_forward_batch=None)  # SGLang's own replay()
    assert torch.equal(out, torch.tensor([4.0, 14.0, 24.0, 34.0]))
    assert backend._graphs[shape_key(4)].replays == 1


class _Recorded:
    """A Triton key warm-up (plugin/triton_key.py) whose wait() is recorded in the event list (where the graph
    phase waits for it)."""

    def __init__(self, events):
        self.events = events

    def wait(self, timeout=10.0):
        self.events.append("triton_key")
        return 0.0


def test_load_restores_where_save_began_its_capture_phase(loaded_plugin, tmp_path):
    """SAVE's arena trace ends at capture_session; LOAD must restore (and compare its trace) there too, before
    SGLang's per-batch preparation allocates (a real 0.5.17 server was refused for one extra 2 MiB segment). Then,
    before that preparation launches the first Triton kernel, it waits for Triton's key (plugin/triton_key.py)."""
    _save_run(tmp_path)
    session = _reopen(tmp_path)
    events = []
    real_restore = session.restore
    session.restore = lambda order=None: (events.append("restore"), real_restore(order))[1]
    state = install_state(session, "load")
    state.triton_key = _Recorded(events)
    backend, calls = make_backend(), []
    with backend.capture_session("stream"):
        events.append("capture_prepare")  # what SGLang runs before each capture_one
        for bs in (8, 4, 1):
            backend.capture_one(shape_key(bs), forward_for(bs, calls))
    assert events == ["restore", "triton_key", "capture_prepare"]
    assert state.triton_key is None  # waited once
    assert calls == [] and state.router.restored_names == ["decode_bs8", "decode_bs4", "decode_bs1"]


def test_load_problem_falls_back_to_live_capture_with_one_line(loaded_plugin, tmp_path, caplog):
    _save_run(tmp_path)
    session = _reopen(tmp_path)
    session.fail_restore = "driver mismatch"
    state = install_state(session, "load")
    backend, calls = make_backend(), []
    # SGLang's own capture_one would call torch.cuda.CUDAGraph(); make the live path observable on CPU.
    seen = []
    state.capture.live_capture = lambda b, key, fn, *a: (seen.append(key.size), fn())
    with caplog.at_level("WARNING"):
        backend.capture_one(shape_key(8), forward_for(8, calls))
        backend.capture_one(shape_key(4), forward_for(4, calls))
    assert seen == [8, 4] and state.router.route == "live" and session.closed
    lines = [r.getMessage() for r in caplog.records if "capturing CUDA graphs live" in r.getMessage()]
    assert len(lines) == 1 and "driver mismatch" in lines[0]


def test_missing_graph_in_archive_is_captured_live(loaded_plugin, tmp_path):
    _save_run(tmp_path, sizes=(8,))
    session = _reopen(tmp_path, "load")
    state = install_state(session, "load")
    seen = []
    state.capture.live_capture = lambda b, key, fn, *a: seen.append(key.size)
    backend = make_backend()
    backend.capture_one(shape_key(8), forward_for(8, []))
    backend.capture_one(shape_key(2), forward_for(2, []))
    assert state.router.restored_names == ["decode_bs8"] and seen == [2]


class KvConfigurator:
    is_draft_worker = False


def _kv_archive(tmp_path, original, before_write=lambda: None):
    """SAVE an archive whose manifest carries the KV-pool configuration; ``before_write`` runs once the pool is
    sized, before the archive is written. Returns the configuration SAVE's server used."""
    session = CpuStandInSession(tmp_path / "kv.foundry", "save", key="k")
    session.open()
    state = install_state(session, "save")
    config = hooks.around_resolve_memory_pool_config(original, KvConfigurator(), 80)
    before_write()
    state.session.added["decode_bs1"] = torch.ones(1)
    state.router.recorded.append("decode_bs1")
    hooks.after_init_cuda_graphs(None, StandInDecodeRunner())
    hooks.reset_state()
    return config


def _kv_load(tmp_path):
    session = CpuStandInSession(tmp_path / "kv.foundry", "load", key="k")
    session.open()
    state = install_state(session, "load")
    needs = hooks._archive_extra(session).get(hooks.EXTRA_KV_NEEDS)
    state.saved_kv_needs_bytes = None if needs is None else int(needs)
    return state


def test_kv_pool_config_recorded_at_save_and_forced_at_load(loaded_plugin, tmp_path):
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

    profiled = []

    def original(self, pre_model_load_memory):
        profiled.append(pre_model_load_memory)
        return MemoryPoolConfig(max_total_num_tokens=4096, max_running_requests=48, mem_fraction_static=0.8)

    cfg = _kv_archive(tmp_path, original)
    assert cfg.max_total_num_tokens == 4096 and profiled == [80]
    state = _kv_load(tmp_path)
    forced = hooks.around_resolve_memory_pool_config(original, KvConfigurator(), 999)
    assert profiled == [80], "LOAD must not profile free memory"
    assert forced == MemoryPoolConfig(max_total_num_tokens=4096, max_running_requests=48, mem_fraction_static=0.8)
    assert state.kv_forced


def test_a_saved_kv_pool_that_no_longer_fits_falls_back_to_live_capture(loaded_plugin, tmp_path, monkeypatch):
    """Another process took GPU memory since SAVE: forcing SAVE's pool would run out of memory, so LOAD lets SGLang
    size its pool and captures live; as long as SAVE's pool and graphs fit, LOAD restores."""
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

    gib = 1 << 30
    free = [40 * gib]
    monkeypatch.setattr(hooks, "_free_gpu_bytes", lambda: free[0])
    profiled = []

    def original(self, pre_model_load_memory):
        profiled.append(pre_model_load_memory)
        return MemoryPoolConfig(max_total_num_tokens=4096, max_running_requests=48, mem_fraction_static=0.8)

    # 40 GiB free when the pool is sized, 10 GiB once the archive is written: pool and graphs took 30 GiB
    _kv_archive(tmp_path, original, before_write=lambda: free.__setitem__(0, 10 * gib))

    free[0] = 30 * gib
    state = _kv_load(tmp_path)
    assert state.saved_kv_needs_bytes == 30 * gib
    hooks.around_resolve_memory_pool_config(original, KvConfigurator(), 80)
    assert state.kv_forced and state.router.route == "load" and profiled == [80]
    hooks.reset_state()
    free[0] = 20 * gib
    state = _kv_load(tmp_path)
    config = hooks.around_resolve_memory_pool_config(original, KvConfigurator(), 80)
    assert not state.kv_forced and state.router.route == "live" and profiled == [80, 80]
    assert config.max_total_num_tokens == 4096      # SGLang's own sizing (the stand-in's)
    assert "does not fit" in state.router.problem and "needs 30.0 GiB and this GPU has 20.0 GiB" in state.router.problem
    hooks.reset_state()
    # ranks sharing the GPU: each one's free memory depends on when the others allocated their pools; no rule
    state = _kv_load(tmp_path)
    state.gpu_to_itself = False
    hooks.around_resolve_memory_pool_config(original, KvConfigurator(), 80)
    assert state.kv_forced and state.router.route == "load"


def test_every_rank_captures_live_when_one_rank_cannot_use_the_saved_kv_pool(loaded_plugin, tmp_path):
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfig

    _kv_archive(tmp_path, lambda self, m: MemoryPoolConfig(max_total_num_tokens=4096, mem_fraction_static=0.8))
    state = _kv_load(tmp_path)
    asked = []
    state.router.agree = lambda ok: asked.append(ok) or False      # another rank said no
    config = hooks.around_resolve_memory_pool_config(
        lambda self, m: MemoryPoolConfig(max_total_num_tokens=1024, mem_fraction_static=0.8), KvConfigurator(), 80)
    assert asked == [True] and config.max_total_num_tokens == 1024 and not state.kv_forced
    assert state.router.route == "live" and "another rank" in state.router.problem


def test_kv_pool_fit_rule():
    gib = 1 << 30
    assert hooks._kv_pool_misfit(None, 1 * gib) is None          # an archive from before the rule
    assert hooks._kv_pool_misfit(8 * gib, None) is None          # no CUDA to ask
    assert hooks._kv_pool_misfit(8 * gib, 8 * gib) is None
    assert hooks._kv_pool_misfit(8 * gib, 8 * gib - 1) is not None


def test_load_without_kv_config_is_blocked(loaded_plugin, tmp_path):
    session = CpuStandInSession(tmp_path / "none.foundry", "save", key="k")
    session.open()
    router = GraphRouter(session, "load")
    router.open()
    router.fall_back("archive has no usable KV-pool configuration (KeyError)")
    assert router.route == "live" and "KV-pool" in router.problem


def stand_in_runner(monkeypatch, tmp_path) -> type:
    """A ModelRunner stand-in (what the BEFORE hook reads) with foundry_core.Session replaced by the CPU one."""
    import foundry_core

    monkeypatch.setattr(foundry_core, "Session", CpuStandInSession, raising=False)

    class Runner:
        is_draft_worker = False
        gpu_id = 0
        server_args = {"model_path": str(tmp_path / "m"), "tp_size": 1, "cuda_graph_backend_prefill": "disabled"}
    return Runner


def test_model_runner_hook_opens_session_and_refuses(loaded_plugin, monkeypatch, tmp_path):
    Runner = stand_in_runner(monkeypatch, tmp_path)
    hooks.reset_state()
    monkeypatch.setenv("FOUNDRY_MODE", "auto")
    hooks.before_model_runner_initialize(Runner())
    state = hooks.current_state()
    assert state is not None and state.router.route == "save"
    assert state.archive_path.startswith(str(tmp_path)) and "-tp1r0-" in state.archive_path
    assert state.session.key.startswith("sglang:")

    hooks.reset_state()
    Runner.server_args = dict(Runner.server_args, enable_memory_saver=True)
    hooks.before_model_runner_initialize(Runner())  # auto: warn, run plain SGLang
    assert hooks.current_state() is None
    monkeypatch.setenv("FOUNDRY_MODE", "save")
    with pytest.raises(plugin.UnsafeFlag, match="--enable-memory-saver"):
        hooks.before_model_runner_initialize(Runner())


def test_logits_output_roundtrips_through_json_treespec():
    import torch.utils._pytree as pytree
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    hooks.register_output_pytrees()
    out = LogitsProcessorOutput(next_token_logits=torch.ones(2, 3), hidden_states=torch.zeros(2, 4))
    leaves, spec = pytree.tree_flatten(out)
    text = pytree.treespec_dumps(spec)
    rebuilt = pytree.tree_unflatten(leaves, pytree.treespec_loads(text))
    assert isinstance(rebuilt, LogitsProcessorOutput)
    assert torch.equal(rebuilt.next_token_logits, out.next_token_logits) and rebuilt.next_token_logprobs is None


def test_graph_names():
    from sglang.srt.model_executor.runner.shape_key import ShapeKey

    assert shape_key_name(ShapeKey(size=8)) == "decode_bs8"
    assert shape_key_name(ShapeKey(size=8, stream_idx=1, variant_label="lora")) == "decode_bs8_s1_vlora"


def _full_collections(body) -> int:
    """How many full (generation 2) garbage collections run during ``body()``."""
    import gc

    seen = []

    def callback(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(callback)
    try:
        body()
    finally:
        gc.callbacks.remove(callback)
    return len(seen)


def test_a_load_skips_the_gc_passes_around_the_capture_loop(loaded_plugin, tmp_path):
    """SGLang's capture loops run inside freeze_gc (a full collection before, freeze, another after): a LOAD has
    nothing to capture and skips both; SAVE and a process without Foundry keep SGLang's own guard."""
    import gc

    from sglang.srt.model_executor.runner import base_cuda_graph_runner, decode_cuda_graph_runner

    guard = decode_cuda_graph_runner.freeze_gc  # the runner module's own `from ... import freeze_gc` binding
    assert plugin._is_registry_wrapper(guard)

    def capture_loop():
        with guard(False):  # enable_cudagraph_gc=False: SGLang collects, freezes, and collects again
            frozen.append(gc.get_freeze_count())

    frozen = []
    assert _full_collections(capture_loop) == 2 and frozen[-1] > 0  # no Foundry state: SGLang's guard
    _save_run(tmp_path)
    assert _full_collections(capture_loop) == 2  # SAVE
    install_state(_reopen(tmp_path), "load")
    assert _full_collections(capture_loop) == 0 and frozen[-1] == 0  # LOAD

    plugin.unregister()
    assert decode_cuda_graph_runner.freeze_gc is base_cuda_graph_runner.freeze_gc
    assert not plugin._is_registry_wrapper(decode_cuda_graph_runner.freeze_gc)


# -- Triton's cache key: computed while the model loads, awaited before the first size (LOAD: above) --------------
def test_save_waits_for_the_key_before_its_captures(loaded_plugin, tmp_path):
    session = CpuStandInSession(tmp_path / "a.foundry", "auto", key="k1")
    session.open()
    state = install_state(session, "save")
    events = []
    state.triton_key = _Recorded(events)
    backend = make_backend()
    with backend.capture_session("stream"):
        events.append("capture_prepare")
    assert events == ["triton_key", "capture_prepare"]


@pytest.mark.parametrize("early", ["1", "0"])
def test_the_model_runner_hook_starts_the_warmup_unless_early_load_is_off(loaded_plugin, monkeypatch, tmp_path,
                                                                           early):
    from foundry_sglang.plugin.triton_key import TritonKeyWarmup

    Runner = stand_in_runner(monkeypatch, tmp_path)
    started = []
    monkeypatch.setattr(TritonKeyWarmup, "start", classmethod(lambda cls, key=None: started.append(1) or cls(None)))
    hooks.reset_state()
    monkeypatch.setenv("FOUNDRY_MODE", "auto")
    monkeypatch.setenv("FOUNDRY_EARLY_LOAD", early)
    hooks.before_model_runner_initialize(Runner())
    state = hooks.current_state()
    assert (state.triton_key is not None) == (early == "1") and started == ([1] if early == "1" else [])
    hooks.reset_state()
