"""Archive keys for the SGLang plugin: one archive per rank, named and keyed by everything that shapes its graphs.

A CUDA graph bakes in kernel choices, tensor shapes and device addresses. Those follow from

* the model: its path, ``config.json`` and the list of weight files (a different checkpoint at the same path
  must not load old graphs);
* the server arguments that change what the decode forward launches or how much memory precedes the graphs
  (:data:`GRAPH_ARGS`, each with the reason it is there);
* the rank layout (TP/EP/DP/PP size and this process's ranks);
* the machine and software stack: GPU, driver, torch, triton, sglang and foundry versions.

:func:`archive_key` turns these into an :class:`ArchiveKey`: a readable file name (which still ends in a short
hash, so two configurations never overwrite each other) and a sha256 key that foundry_core stores in the
archive's fingerprint and compares verbatim at LOAD. Pure Python; the machine facts are injectable for tests.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger("foundry_sglang.keys")

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

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class RankLayout:
    """Where this scheduler process sits in the parallel layout."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0

    def tag(self) -> str:
        parts = [f"tp{self.tp_size}r{self.tp_rank}"]
        if self.ep_size > 1:
            parts.append(f"ep{self.ep_size}r{self.ep_rank}")
        if self.dp_size > 1:
            parts.append(f"dp{self.dp_size}r{self.dp_rank}")
        if self.pp_size > 1:
            parts.append(f"pp{self.pp_size}r{self.pp_rank}")
        return "-".join(parts)


@dataclass(frozen=True)
class ArchiveKey:
    """A per-rank archive: ``file_name`` inside the archive directory, ``key`` for the archive fingerprint."""

    file_name: str
    key: str  # "sglang:" + sha256 hex of ``material``
    material: str  # canonical JSON of everything hashed (stored in the manifest's extra for inspection)

    def path(self, archive_dir: str | os.PathLike) -> Path:
        return Path(archive_dir) / self.file_name


def model_identity(model_path: str) -> dict[str, str]:
    """Hashes of a model's config.json and weights index (or weight file list with sizes).

    A path that is not a local directory (a hub id) is keyed by its name only; say so in the log, since a
    changed remote checkpoint under the same id would then not change the key.
    """
    root = Path(model_path).expanduser()
    if not root.is_dir():
        log.info("model %s is not a local directory; keying by its name only", model_path)
        return {"config_sha256": "", "weights_sha256": "", "local": "no"}
    config = root / "config.json"
    config_hash = _sha256_file(config) if config.is_file() else ""
    h = hashlib.sha256()
    for name in _INDEX_FILES:
        if (root / name).is_file():
            h.update(name.encode() + b"\0" + bytes.fromhex(_sha256_file(root / name)))
    for f in sorted(root.iterdir()):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
    return {"config_sha256": config_hash, "weights_sha256": h.hexdigest(), "local": "yes"}


def graph_args(server_args: Any) -> dict[str, Any]:
    """The :data:`GRAPH_ARGS` fields of ``server_args`` (any object with attributes, or a mapping) as JSON values."""
    out: dict[str, Any] = {}
    for fields in GRAPH_ARGS.values():
        for name in fields:
            if isinstance(server_args, Mapping):
                value = server_args.get(name, _MISSING)
            else:
                value = getattr(server_args, name, _MISSING)
            out[name] = "<missing>" if value is _MISSING else _jsonable(value)
    return out


def machine_facts(device: int = 0) -> dict[str, str]:
    """GPU name, compute capability, driver and library versions of this machine ("none" without a GPU)."""
    facts = {"sglang": _dist_version("sglang"), "foundry": _foundry_version()}
    try:
        from foundry_core.fingerprint import current_fingerprint

        fp = current_fingerprint("", device)
        facts.update(gpu=fp.gpu_name, capability=fp.compute_capability, driver=str(fp.driver_version),
                     cuda_runtime=fp.cuda_runtime, torch=fp.torch, triton=fp.triton)
    except Exception as err:  # no GPU (CPU CI) or no driver: still a valid, distinct key
        import torch

        facts.update(gpu="none", capability="", driver="", cuda_runtime=torch.version.cuda or "",
                     torch=torch.__version__, triton=_dist_version("triton"))
        log.debug("no GPU facts for the archive key: %s", err)
    return facts


def archive_key(
    server_args: Any,
    layout: RankLayout,
    machine: Optional[Mapping[str, str]] = None,
    model: Optional[Mapping[str, str]] = None,
) -> ArchiveKey:
    """The archive key of one rank. ``machine``/``model`` default to :func:`machine_facts`/:func:`model_identity`."""
    args = graph_args(server_args)
    model_path = str(args.get("model_path") or "")
    material = {
        "schema": 1,
        "model_path": model_path,
        "model": dict(model if model is not None else model_identity(model_path)),
        "server_args": args,
        "layout": asdict(layout),
        "machine": dict(machine if machine is not None else machine_facts()),
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    stem = _slug(Path(model_path.rstrip("/")).name or "model")
    return ArchiveKey(file_name=f"{stem}-{layout.tag()}-{digest[:12]}.foundry", key=f"sglang:{digest}",
                      material=text)


def describe_difference(old_material: str, new_material: str) -> str:
    """One line naming the key fields that differ between two ``ArchiveKey.material`` strings."""
    try:
        old, new = _flatten(json.loads(old_material)), _flatten(json.loads(new_material))
    except ValueError:
        return "key material unreadable"
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not diff:
        return "no difference"
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
    return shown + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")


# -- helpers ---------------------------------------------------------------------------------------
_MISSING = object()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return repr(value)  # enums, dataclasses (e.g. CudaGraphConfig): their repr lists every field


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:64] or "model"


def _dist_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _foundry_version() -> str:
    import foundry_core

    return foundry_core.__version__
