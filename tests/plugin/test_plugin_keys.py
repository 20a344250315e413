"""Archive keys change with every graph-relevant input; unsafe flags are reported with the flag's name."""
from __future__ import annotations

import json

import pytest

from foundry_sglang import plugin
from foundry_sglang.graphs.keys import RankLayout, describe_difference, model_identity
from foundry_sglang.plugin.keys import GRAPH_ARGS
from foundry_sglang.plugin.keys import sglang_archive_key as archive_key
from foundry_sglang.plugin.parallel import parallel_refusal, world_size

MACHINE = {"gpu": "NVIDIA H200", "capability": "9.0", "driver": "13000", "cuda_runtime": "13.0",
           "torch": "2.11.0", "triton": "3.6.0", "sglang": "0.5.23", "foundry": "0.1.0"}
BASE = {"model_path": "/models/qwen3-8b", "dtype": "bfloat16", "kv_cache_dtype": "auto", "page_size": 1,
        "context_length": 4096, "cuda_graph_max_bs_decode": 256, "attention_backend": "triton", "tp_size": 1}


def key(args=BASE, layout=RankLayout(), machine=MACHINE, model=None):
    return archive_key(args, layout, machine=machine, model=model or {"config_sha256": "c", "weights_sha256": "w"})


def test_key_is_stable_and_named_readably():
    a, b = key(), key()
    assert a == b and a.key.startswith("sglang:") and len(a.key) == len("sglang:") + 64
    assert a.file_name.startswith("qwen3-8b-tp1r0-") and a.file_name.endswith(".foundry")


@pytest.mark.parametrize("field,value", [
    ("dtype", "float16"), ("kv_cache_dtype", "fp8_e4m3"), ("attention_backend", "flashinfer"),
    ("cuda_graph_max_bs_decode", 128), ("cuda_graph_bs_decode", [1, 2, 4]), ("page_size", 16),
    ("context_length", 8192), ("quantization", "fp8"), ("speculative_algorithm", "EAGLE"),
    ("enable_dp_attention", True), ("enable_torch_compile", True), ("mem_fraction_static", 0.7),
    ("model_path", "/models/other"), ("max_running_requests", 64), ("disable_custom_all_reduce", True),
])
def test_every_graph_relevant_arg_changes_the_key(field, value):
    changed = key(dict(BASE, **{field: value}))
    assert changed.key != key().key
    assert field in describe_difference(key().material, changed.material)


def test_irrelevant_args_do_not_change_the_key():
    assert key(dict(BASE, port=30001, log_level="debug", api_key="x")).key == key().key


@pytest.mark.parametrize("layout", [RankLayout(tp_size=2, tp_rank=1), RankLayout(ep_size=2),
                                    RankLayout(dp_size=2, dp_rank=1), RankLayout(pp_size=2, pp_rank=1)])
def test_layout_changes_key_and_name(layout):
    k = key(layout=layout)
    assert k.key != key().key and k.file_name != key().file_name


@pytest.mark.parametrize("field", sorted(MACHINE))
def test_machine_and_versions_change_the_key(field):
    assert key(machine=dict(MACHINE, **{field: MACHINE[field] + "x"})).key != key().key


def test_model_identity_tracks_config_and_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 10)
    first = model_identity(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 16}))
    second = model_identity(str(tmp_path))
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 11)
    third = model_identity(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    fourth = model_identity(str(tmp_path))
    assert first["config_sha256"] != second["config_sha256"]
    assert second["weights_sha256"] != third["weights_sha256"] != fourth["weights_sha256"]
    args = dict(BASE, model_path=str(tmp_path))
    assert archive_key(args, RankLayout(), machine=MACHINE).key != key(args).key  # real identity vs placeholder


def test_graph_args_exist_in_sglang_server_args():
    sa = pytest.importorskip("sglang.srt.server_args")
    fields = set(sa.ServerArgs.__struct_fields__)
    listed = {f for group in GRAPH_ARGS.values() for f in group}
    assert listed - fields == set(), "GRAPH_ARGS names a field sglang 0.5.23 does not have"


# -- flags -----------------------------------------------------------------------------------------
SAFE = dict(BASE, cuda_graph_backend_prefill="disabled")


@pytest.mark.parametrize("field,value,flag", [
    ("enable_memory_saver", True, "--enable-memory-saver"),
    ("cuda_graph_backend_decode", "breakable", "--cuda-graph-backend-decode"),
    ("cuda_graph_backend_prefill", None, "--cuda-graph-backend-prefill disabled"),
    ("use_ray", True, "--use-ray"),
    ("enable_symm_mem", True, "--enable-symm-mem"),
    ("enable_nccl_nvls", True, "--enable-nccl-nvls"),
    ("tp_size", 2, "--disable-custom-all-reduce"),  # custom all-reduce is SGLang's default with TP > 1
    ("pp_size", 2, "--pp-size 2"),
    ("enable_dp_attention", True, "--enable-dp-attention"),
    ("speculative_algorithm", "EAGLE", "--speculative-algorithm"),
    ("enable_pdmux", True, "--enable-pdmux"),
    ("enable_lora", True, "--enable-lora"),
    ("cpu_offload_gb", 4, "--cpu-offload-gb"),
])
def test_unsafe_flags_are_named(field, value, flag):
    args = dict(SAFE, **{field: value})
    problems = plugin.refusals(args)
    assert problems and flag in problems[0]
    assert plugin.check_flags(args, "auto") == problems[0]
    assert plugin.check_flags(args, "load") == problems[0]  # load falls back (FoundryMode.strict)
    with pytest.raises(plugin.UnsafeFlag, match=flag.split()[0]):
        plugin.check_flags(args, "save")


def test_safe_flags_pass_and_disabled_graphs_make_plugin_idle():
    assert plugin.refusals(SAFE) == [] and plugin.check_flags(SAFE, "save") is None
    reason = plugin.check_flags(dict(SAFE, disable_cuda_graph=True), "save")
    assert "--disable-cuda-graph" in reason


def test_tp_and_ep_over_nccl_restore_and_the_rest_is_refused_by_flag():
    nccl_tp = {"tp_size": 2, "disable_custom_all_reduce": True}
    assert parallel_refusal({"tp_size": 1}) is None
    assert parallel_refusal(nccl_tp) is None and parallel_refusal(dict(nccl_tp, ep_size=2)) is None
    assert world_size(nccl_tp) == 2 and world_size(dict(nccl_tp, ep_size=2)) == 2
    custom = parallel_refusal({"tp_size": 2})
    assert custom.startswith("--tp-size > 1 with SGLang's custom all-reduce")
    assert "--disable-custom-all-reduce" in custom
    for extra, flag in (({"pp_size": 2}, "--pp-size 2"), ({"enable_dp_attention": True}, "--enable-dp-attention"),
                        ({"moe_a2a_backend": "deepep"}, "--moe-a2a-backend deepep"), ({"dp_size": 2}, "--dp-size 2"),
                        ({"enable_symm_mem": True}, "--enable-symm-mem"),
                        ({"enable_flashinfer_allreduce_fusion": True}, "--enable-flashinfer-allreduce-fusion"),
                        ({"flashinfer_allreduce_fusion_backend": "auto"}, "--enforce-disable-flashinfer-allreduce")):
        assert flag in parallel_refusal(dict(nccl_tp, **extra)), flag
    # SGLang's own choice of the fusion, turned off as the launcher does: restorable again
    assert parallel_refusal(dict(nccl_tp, flashinfer_allreduce_fusion_backend="auto",
                                 enforce_disable_flashinfer_allreduce_fusion=True)) is None
    assert parallel_refusal(dict(nccl_tp, flashinfer_allreduce_fusion_backend=None)) is None


def test_config_from_env():
    assert plugin.config_from_env({}).mode == "off"
    assert plugin.config_from_env({"FOUNDRY_ARCHIVE": "/a"}).mode == "auto"
    assert plugin.config_from_env({"FOUNDRY_MODE": "LOAD"}).mode == "load"
    with pytest.raises(plugin.UnsafeFlag, match="FOUNDRY_MODE"):
        plugin.config_from_env({"FOUNDRY_MODE": "sometimes"})
