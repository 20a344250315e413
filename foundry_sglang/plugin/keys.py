"""The archive key material of an SGLang server: which ServerArgs shape the decode graphs, and why.

A CUDA graph bakes in kernel choices, tensor shapes and device addresses. For SGLang those follow from

* the model: its path, ``config.json`` and the list of weight files (a different checkpoint at the same path
  must not load old graphs);
* the server arguments that change what the decode forward launches or how much memory precedes the graphs
  (:data:`GRAPH_ARGS`, each group with the reason it is there);
* the rank layout (TP/EP/DP/PP size and this process's ranks);
* the machine and software stack: GPU, driver, torch, triton, sglang and foundry versions.

:func:`sglang_archive_key` gathers them and hands them to the one key scheme,
:func:`foundry_sglang.graphs.keys.archive_key`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from foundry_sglang.graphs.keys import ArchiveKey, RankLayout, archive_key, jsonable, machine_facts, model_identity

__all__ = ["GRAPH_ARGS", "graph_args", "sglang_archive_key"]

#: ServerArgs fields (sglang 0.5.23, ``srt/server_args.py``) that change the captured decode graphs or the memory
#: allocated before them, grouped by why. Fields absent from a given sglang build are recorded as missing.
GRAPH_ARGS: dict[str, tuple[str, ...]] = {
    # Numerics: which kernels run and on which dtypes.
    "numerics": (
        "dtype", "quantization", "quantization_param_path", "kv_cache_dtype", "enable_fp32_lm_head",
        "modelopt_quant", "enable_tf32_matmul", "triton_attention_reduce_in_fp32", "enable_deterministic_inference",
        "fp8_gemm_runner_backend", "fp4_gemm_runner_backend", "bf16_gemm_backend", "moe_runner_backend",
        "enable_fused_qk_norm_rope", "enable_nvidia_megakernel",
    ),
    # Attention kernels and their metadata buffers (captured by address).
    "attention": (
        "attention_backend", "decode_attention_backend", "prefill_attention_backend", "sampling_backend",
        "triton_attention_num_kv_splits", "triton_attention_split_tile_size", "linear_attn_backend",
        "linear_attn_decode_backend", "mamba_backend", "mamba_ssm_dtype",
    ),
    # Shapes: graph batch sizes, sequence limits, KV paging (page tables and KV sizes are graph inputs).
    "shapes": (
        "cuda_graph_config", "cuda_graph_backend_decode", "cuda_graph_backend_prefill", "cuda_graph_max_bs_decode",
        "cuda_graph_bs_decode", "disable_cuda_graph", "disable_decode_cuda_graph", "disable_prefill_cuda_graph",
        "disable_cuda_graph_padding", "context_length", "page_size", "max_running_requests", "max_total_tokens",
        "chunked_prefill_size", "max_prefill_tokens", "swa_full_tokens_ratio", "disable_hybrid_swa_memory",
        "enable_return_hidden_states", "enable_return_aux_hidden_states", "json_model_override_args",
        "enable_multimodal", "is_embedding",
    ),
    # Memory before the graphs: what is allocated (weights, KV, workspaces) and in which order.
    "memory": (
        "mem_fraction_static", "load_format", "cpu_offload_gb", "enable_hierarchical_cache", "enable_memory_saver",
        "enable_unified_memory", "enable_page_major_kv_layout", "disable_radix_cache", "enable_lora",
        "max_lora_rank", "max_loras_per_batch", "lora_backend",
    ),
    # Compilation: torch.compile changes every kernel in the compiled buckets.
    "compile": ("enable_torch_compile", "torch_compile_max_bs"),
    # Parallelism and communication kernels inside the graphs.
    "parallel": (
        "tp_size", "pp_size", "dp_size", "ep_size", "attn_cp_size", "moe_dense_tp_size", "enable_dp_attention",
        "enable_dp_lm_head", "moe_a2a_backend", "deepep_mode", "ep_num_redundant_experts", "init_expert_location",
        "disable_custom_all_reduce", "enable_symm_mem", "enable_nccl_nvls", "enable_torch_symm_mem", "enable_mscclpp",
        "enable_flashinfer_allreduce_fusion", "enable_two_batch_overlap", "enable_single_batch_overlap",
        "enable_pdmux",
    ),
    # Speculative decoding replaces the decode graph by a verify graph (and adds a draft model).
    "speculative": (
        "speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps", "speculative_eagle_topk",
        "speculative_num_draft_tokens", "speculative_attention_mode",
    ),
    # Model identity as SGLang resolves it.
    "model": ("model_path", "revision", "model_impl", "trust_remote_code"),
}



def graph_args(server_args: Any) -> dict[str, Any]:
    """The :data:`GRAPH_ARGS` fields of ``server_args`` (any object with attributes, or a mapping) as JSON values."""
    out: dict[str, Any] = {}
    for fields in GRAPH_ARGS.values():
        for name in fields:
            if isinstance(server_args, Mapping):
                value = server_args.get(name, _MISSING)
            else:
                value = getattr(server_args, name, _MISSING)
            out[name] = "<missing>" if value is _MISSING else jsonable(value)
    return out


def sglang_archive_key(
    server_args: Any,
    layout: RankLayout,
    machine: Optional[Mapping[str, str]] = None,
    model: Optional[Mapping[str, str]] = None,
    per_rank: bool = True,
) -> ArchiveKey:
    """The archive key of one SGLang rank (``per_rank=False``: of the layout's rank template, shared by every
    rank). ``machine``/``model`` default to :func:`machine_facts` / :func:`model_identity` (injectable for
    tests)."""
    args = graph_args(server_args)
    model_path = str(args.get("model_path") or "")
    material = {
        "model_path": model_path,
        "model": dict(model if model is not None else model_identity(model_path)),
        "server_args": args,
        "machine": dict(machine if machine is not None else machine_facts()),
    }
    return archive_key("sglang", model_path, material, layout, per_rank=per_rank)


_MISSING = object()
