"""The SGLang version adapter against minimal descriptions of 0.5.17 (vendored below) and the installed 0.5.23."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import List, Optional

import pytest

from foundry_sglang.plugin import compat


# -- SGLang 0.5.17, as far as Foundry reads it (srt/model_executor/cuda_graph_config.py, pool_configurator.py) --
@dataclasses.dataclass
class PhaseConfig017:
    backend: str = "disabled"
    max_bs: Optional[int] = None
    bs: Optional[List[int]] = None
    tc_compiler: str = "eager"


@dataclasses.dataclass
class CudaGraphConfig017:
    decode: PhaseConfig017 = dataclasses.field(default_factory=lambda: PhaseConfig017(backend="full"))
    prefill: PhaseConfig017 = dataclasses.field(default_factory=lambda: PhaseConfig017(backend="breakable"))


@dataclasses.dataclass
class MemoryPoolConfig017:
    max_total_num_tokens: int
    max_running_requests: Optional[int] = None
    full_max_total_num_tokens: Optional[int] = None
    swa_max_total_num_tokens: Optional[int] = None
    c4_max_total_num_tokens: int = 0
    c128_max_total_num_tokens: int = 0
    c4_state_pool_size: int = 0
    c128_state_pool_size: int = 0
    mem_fraction_static: Optional[float] = None


def args017(prefill="disabled", decode="full", **flags):
    """0.5.17 ServerArgs after prepare_server_args: the pinned flag is kept *and* folded into cuda_graph_config."""
    config = CudaGraphConfig017(decode=PhaseConfig017(backend=decode), prefill=PhaseConfig017(backend=prefill))
    return dict(cuda_graph_config=config, cuda_graph_backend_prefill=prefill, **flags)


def test_017_resolved_config_gives_the_backends():
    assert compat.graph_backends(args017()) == ("full", "disabled")
    assert compat.graph_backends(args017(prefill="breakable")) == ("full", "breakable")
    assert compat.graph_backends(args017(decode="disabled")) == ("disabled", "disabled")


def test_017_resolved_config_wins_over_raw_flags():
    # SGLang's precedence: the config (JSON or resolved) over --cuda-graph-backend-* over --disable-*.
    args = args017(prefill="breakable")
    args["cuda_graph_backend_prefill"] = "disabled"
    assert compat.graph_backends(args)[1] == "breakable"


def test_023_flags_without_config():
    assert compat.graph_backends({"cuda_graph_config": None}) == (None, None)  # SGLang's defaults
    assert compat.graph_backends({"cuda_graph_backend_prefill": "disabled"}) == (None, "disabled")
    assert compat.graph_backends({"disable_prefill_cuda_graph": True}) == (None, "disabled")
    assert compat.graph_backends({"disable_cuda_graph": True}) == ("disabled", "disabled")
    assert compat.graph_backends({"disable_cuda_graph": True, "cuda_graph_backend_decode": "full"}) == \
        ("full", "disabled")


def test_raw_json_config_from_the_command_line():
    raw = json.dumps({"decode": {"backend": "full", "max_bs": 64}, "prefill": {"backend": "disabled"}})
    assert compat.graph_backends({"cuda_graph_config": raw}) == ("full", "disabled")
    assert compat.decode_batch_settings({"cuda_graph_config": raw}) == (64, None)
    assert compat.graph_backends({"cuda_graph_config": "{not json"}) == (None, None)


def test_decode_batch_settings_from_either_form():
    config = CudaGraphConfig017(decode=PhaseConfig017(backend="full", max_bs=32, bs=[1, 2, 4]))
    assert compat.decode_batch_settings({"cuda_graph_config": config}) == (32, [1, 2, 4])
    assert compat.decode_batch_settings({"cuda_graph_max_bs_decode": 16}) == (16, None)


class _Precarve:
    def __init__(self):
        self.calls = []

    def measure(self):
        self.calls.append("measure")
        return contextlib.nullcontext()

    def mint(self):
        self.calls.append("mint")


def test_precarve_is_used_when_present_and_skipped_on_017():
    class Backend023:
        _precarve = _Precarve()

    class Backend017:  # 0.5.17's FullCudaGraphBackend has no precarver
        pass

    with compat.precarve_measure(Backend023()):
        compat.precarve_mint(Backend023())
    assert Backend023._precarve.calls == ["measure", "mint"]
    with compat.precarve_measure(Backend017()):
        compat.precarve_mint(Backend017())


def test_memory_pool_config_across_versions():
    saved_017 = dataclasses.asdict(MemoryPoolConfig017(max_total_num_tokens=4096, max_running_requests=48))
    assert compat.memory_pool_config(MemoryPoolConfig017, saved_017) == MemoryPoolConfig017(4096, 48)
    saved_023 = dict(saved_017, unified_memory_pool_bytes=None, unified_total_bytes=None)
    assert compat.memory_pool_config(MemoryPoolConfig017, saved_023).max_total_num_tokens == 4096
    with pytest.raises(compat.IncompatiblePoolConfig, match="unified_total_bytes"):
        compat.memory_pool_config(MemoryPoolConfig017, dict(saved_023, unified_total_bytes=1 << 30))


def test_memory_pool_config_of_the_installed_sglang():
    pc = pytest.importorskip("sglang.srt.model_executor.pool_configurator")
    saved_017 = dataclasses.asdict(MemoryPoolConfig017(max_total_num_tokens=4096, max_running_requests=48))
    config = compat.memory_pool_config(pc.MemoryPoolConfig, saved_017)
    assert (config.max_total_num_tokens, config.max_running_requests) == (4096, 48)


def test_parallel_value_before_sglang_published_it():
    class Unpublished:
        @property
        def tp_size(self):  # 0.5.17: get_tp_group() asserts
            raise AssertionError("tensor model parallel group is not initialized")

        @property
        def tp_rank(self):  # 0.5.23: runtime context raises ValueError
            raise ValueError("not published")

    class Published:
        tp_size, tp_rank = 2, 1

    assert compat.parallel_value(Unpublished(), "tp_size") is None
    assert compat.parallel_value(Unpublished(), "tp_rank") is None
    assert compat.parallel_value(None, "tp_size") is None
    assert compat.parallel_value(Published(), "tp_size") == 2


# -- the plugin's flag policy on 0.5.17-resolved args ----------------------------------------------------------
def test_017_flag_check_accepts_the_pinned_prefill_flag():
    from foundry_sglang.plugin.flags import check_flags, refusals

    pinned = args017(prefill="disabled")
    assert refusals(pinned) == [] and check_flags(pinned, "save") is None
    default = args017(prefill="breakable")  # what 0.5.17 resolves without the pin
    assert any("prefill CUDA graphs" in x for x in refusals(default))
    assert any("breakable" in x for x in refusals(args017(decode="breakable")))
    assert "disabled" in check_flags(args017(decode="disabled"), "save")  # nothing to do, not a refusal


def test_user_json_config_is_judged_by_what_it_says():
    from foundry_sglang.plugin.flags import refusals

    ok = json.dumps({"decode": {"backend": "full", "max_bs": 64}, "prefill": {"backend": "disabled"}})
    assert refusals({"cuda_graph_config": ok}) == []
    bad = json.dumps({"decode": {"backend": "full"}, "prefill": {"backend": "full"}})
    assert any("prefill CUDA graphs" in x for x in refusals({"cuda_graph_config": bad}))


# -- the kernel-image recorder starts at the entry point of spawned processes ---------------------------------
class _FakeRecorder:
    started = 0

    def start(self, warn_if_late=True):
        _FakeRecorder.started += 1
        _FakeRecorder.warned = warn_if_late
        return self


def test_image_recorder_starts_early_only_in_spawned_processes(monkeypatch):
    import multiprocessing

    import foundry_core.recorder as recorder
    from foundry_sglang import plugin

    monkeypatch.setattr(recorder, "ImageRecorder", _FakeRecorder)
    _FakeRecorder.started = 0
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: None)  # the launcher's own process
    plugin.start_image_recorder_early()
    assert _FakeRecorder.started == 0
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())  # a scheduler process
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: False)
    plugin.start_image_recorder_early()
    assert _FakeRecorder.started == 1
    # CUDA initialised by SGLang's imports but no kernel run yet: modules load lazily, so still start (this
    # skip made a real Qwen3-MoE SAVE miss torch's fill-kernel module on the H200)
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: True)
    plugin.start_image_recorder_early()
    assert _FakeRecorder.started == 2 and _FakeRecorder.warned is False
