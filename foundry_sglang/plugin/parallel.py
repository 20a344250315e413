"""SGLang's parallel layouts: which ones the plugin saves and restores, and a one-line refusal for the others.

A decode graph of one rank of an SGLang TP/EP server reads weights, KV cache and static buffers (the deterministic
arena puts them at the same addresses in SAVE and LOAD) and issues collectives through SGLang's
``GroupCoordinator`` (pynccl, or torch's NCCL). Those collectives become Foundry slots
(:mod:`foundry_sglang.plugin.collectives`), so **tensor and expert parallelism over NCCL restore**: one rank
template per layout, its slots filled with the new process's live communicators.

Refused, because the graphs would hold state no slot stands for (each refusal names the flag to change):

* **custom all-reduce** (SGLang's default when TP > 1): its kernels take the IPC-mapped addresses of the peers'
  signal and graph buffers by value, mapped by ``cudaIpcOpenMemHandle`` outside any allocator Foundry controls;
  ``--disable-custom-all-reduce`` makes the all-reduces NCCL ones (``python -m foundry_sglang.launch`` adds it);
* symmetric memory, NVLS, torch symmetric memory, MSCCL++ and FlashInfer all-reduce fusion: multicast objects,
  symmetric windows and workspaces mapped by those libraries. SGLang 0.5.17 turns the fusion on by itself for
  some MoE models (Qwen3-MoE among them) with TP > 1 on Hopper and Blackwell
  (``flashinfer_allreduce_fusion_backend="auto"``); ``--enforce-disable-flashinfer-allreduce-fusion`` keeps it
  off (``python -m foundry_sglang.launch`` adds it);
* pipeline parallelism (send/recv between stages), data-parallel attention and data parallelism, context
  parallelism, and MoE all-to-all backends (DeepEP, Mooncake, ...): collectives and buffers outside
  ``GroupCoordinator``'s all-reduce / all-gather / reduce-scatter.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["COMM_FLAGS", "parallel_refusal", "world_size"]

#: Flags whose presence puts library-mapped memory into the graphs (any TP size).
COMM_FLAGS = {
    "enable_symm_mem": "--enable-symm-mem",
    "enable_nccl_nvls": "--enable-nccl-nvls",
    "enable_torch_symm_mem": "--enable-torch-symm-mem",
    "enable_mscclpp": "--enable-mscclpp",
    "enable_flashinfer_allreduce_fusion": "--enable-flashinfer-allreduce-fusion",
}


def _get(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def _size(args: Any, name: str) -> int:
    return int(_get(args, name, 1) or 1)


def world_size(args: Any) -> int:
    """Processes (ranks) of one server of these args: TP x PP (EP lives inside the TP group)."""
    return _size(args, "tp_size") * _size(args, "pp_size")


def parallel_refusal(args: Any) -> Optional[str]:
    """None when this layout's decode graphs can be saved and restored, else one line naming the flag."""
    for field, flag in COMM_FLAGS.items():
        if _get(args, field, False):
            return f"{flag} maps library memory into the graphs that a restore cannot re-create; remove {flag}"
    tp = _size(args, "tp_size")
    fusion = _get(args, "flashinfer_allreduce_fusion_backend", None)
    if tp > 1 and fusion not in (None, "none") and not _get(args, "enforce_disable_flashinfer_allreduce_fusion", False):
        return (f"--flashinfer-allreduce-fusion-backend {fusion} (SGLang's choice for this model with TP > 1) maps "
                "FlashInfer's IPC workspace into the graphs, which a restore cannot re-create; add "
                "--enforce-disable-flashinfer-allreduce-fusion (python -m foundry_sglang.launch adds it for you)")
    if tp > 1 and not _get(args, "disable_custom_all_reduce", False):
        return ("--tp-size > 1 with SGLang's custom all-reduce: its kernels hold IPC-mapped peer addresses that a "
                "new process maps elsewhere; add --disable-custom-all-reduce (python -m foundry_sglang.launch adds "
                "it for you)")
    for name, flag in (("pp_size", "--pp-size"), ("dp_size", "--dp-size"), ("attn_cp_size", "--attn-cp-size")):
        if _size(args, name) > 1:
            return f"{flag} {_size(args, name)}: not supported by Foundry's graph restore; use {flag} 1"
    if _get(args, "enable_dp_attention", False):
        return "--enable-dp-attention gathers across data-parallel ranks outside what Foundry restores; remove it"
    if _get(args, "enable_dp_lm_head", False):
        return "--enable-dp-lm-head is not supported by Foundry's graph restore; remove it"
    a2a = _get(args, "moe_a2a_backend", None)
    if a2a not in (None, "none"):
        return (f"--moe-a2a-backend {a2a}: its all-to-all buffers are mapped by the backend, not restored by "
                "Foundry; use --moe-a2a-backend none")
    return None
