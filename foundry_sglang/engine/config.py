"""Engine arguments, model configuration and the ``builtin:`` presets.

A model is named either by a local HuggingFace directory (``config.json`` + ``*.safetensors`` + tokenizer files)
or by a preset ``builtin:NAME`` with seeded random weights and a byte-level tokenizer. Preset fields can be
overridden in the name: ``builtin:qwen3-8b?num_hidden_layers=4&max_position_embeddings=8192``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional
from urllib.parse import parse_qsl

from foundry_sglang.graphs.settings import FoundryConfig

# SGLang's default decode batch sizes on an H200 (tp < 4): [1, 2, 4, 8, 12] + range(16, 257, 8).
DEFAULT_CUDA_GRAPH_BS: List[int] = [1, 2, 4, 8, 12] + list(range(16, 257, 8))


class ConfigError(ValueError):
    """A user-facing configuration problem (one line)."""


@dataclass
class ModelConfig:
    """The subset of a Qwen3 / Qwen3-MoE ``config.json`` the engine uses."""

    architecture: str = "Qwen3ForCausalLM"
    vocab_size: int = 272
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # MoE (Qwen3-MoE); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)
    eos_token_id: Optional[int] = None
    torch_dtype: str = "bfloat16"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        return (self.is_moe and i not in self.mlp_only_layers
                and (i + 1) % max(1, self.decoder_sparse_step) == 0)

    @classmethod
    def from_dict(cls, d: Dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        archs = d.get("architectures") or [d.get("architecture", cls.architecture)]
        kw["architecture"] = archs[0]
        if "head_dim" not in d and "hidden_size" in d and "num_attention_heads" in d:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if "num_key_value_heads" not in d and "num_attention_heads" in d:
            kw["num_key_value_heads"] = d["num_attention_heads"]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if d.get("rope_scaling"):
            raise ConfigError("rope_scaling is not supported by the built-in engine")
        cfg = cls(**kw)
        if cfg.architecture not in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            raise ConfigError(f"unsupported architecture {cfg.architecture!r} "
                              "(the built-in engine runs Qwen3ForCausalLM and Qwen3MoeForCausalLM)")
        return cfg


_TINY = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
             torch_dtype="float32")
PRESETS: Dict[str, Dict] = {
    "tiny": dict(_TINY),
    "tiny-moe": dict(_TINY, architecture="Qwen3MoeForCausalLM", num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
    "qwen3-30b-a3b": dict(architecture="Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, max_position_embeddings=40960),
}


def _coerce(value: str, like):
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {value!r}")
    try:
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, list):
            return [int(v) for v in value.split(",") if v]
    except ValueError:
        raise ConfigError(f"bad preset override value {value!r}") from None
    return value


def is_builtin(model: str) -> bool:
    return model.startswith("builtin:")


def builtin_config(model: str) -> ModelConfig:
    """``builtin:NAME?key=value&...`` -> ModelConfig."""
    spec = model[len("builtin:"):]
    name, _, query = spec.partition("?")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    cfg = ModelConfig.from_dict(PRESETS[name])
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if not hasattr(cfg, key) or key == "architecture":
            raise ConfigError(f"unknown preset override {key!r}")
        setattr(cfg, key, _coerce(value, getattr(cfg, key)))
    return cfg


def load_model_config(model: str) -> ModelConfig:
    if is_builtin(model):
        return builtin_config(model)
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model {model!r} is neither builtin:NAME nor a directory with config.json")
    with open(path, encoding="utf-8") as f:
        try:
            return ModelConfig.from_dict(json.load(f))
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from None


@dataclass
class EngineArgs:
    """Everything needed to start an engine; the server flags map 1:1 onto these fields, except
    ``--foundry-archive``/``--foundry-mode``, which are resolved once into ``foundry`` where the flags are parsed
    (``flags.engine_args_from``)."""

    model: str = "builtin:tiny"
    tokenizer: Optional[str] = None
    tp: int = 1
    ep: int = 1
    dtype: str = "auto"             # auto | bfloat16 | float16 | float32
    device: str = "auto"            # auto | cpu | cuda
    max_num_seqs: int = 256
    max_model_len: Optional[int] = None
    max_num_batched_tokens: int = 8192
    page_size: int = 16
    num_kv_pages: Optional[int] = None   # None: derived from gpu_memory_fraction (GPU) or a CPU default
    gpu_memory_fraction: float = 0.85
    cuda_graph_max_bs: Optional[int] = None
    cuda_graph_bs: Optional[List[int]] = None
    disable_cuda_graph: bool = False
    seed: int = 0
    served_model_name: Optional[str] = None
    foundry: FoundryConfig = FoundryConfig()  # the resolved Foundry settings (a mapping of them is converted)
    dist_port: Optional[int] = None  # rendezvous port of the ranks (free port if None)
    gpu_ids: Optional[List[int]] = None  # rank r runs on cuda:gpu_ids[r] (default: cuda:r); repeats share a GPU

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    def gpu_of(self, rank: int) -> int:
        return self.gpu_ids[rank] if self.gpu_ids else rank

    def rank_gpus(self) -> List[int]:
        """The GPU of every rank, in rank order."""
        return list(self.gpu_ids[: self.world_size]) if self.gpu_ids else list(range(self.world_size))

    @property
    def ranks_per_gpu(self) -> int:
        """The most ranks that share one GPU (1: one GPU per rank)."""
        gpus = self.rank_gpus()
        return max(gpus.count(g) for g in gpus)

    @property
    def ranks_share_gpu(self) -> bool:
        return self.ranks_per_gpu > 1

    def __post_init__(self) -> None:
        if isinstance(self.foundry, Mapping):  # from JSON (to_dict) or dataclasses.asdict
            try:
                self.foundry = FoundryConfig.from_dict(self.foundry)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def to_dict(self) -> Dict[str, Any]:
        """The fields as JSON values (``EngineArgs(**d)`` reads them back)."""
        return {**dataclasses.asdict(self), "foundry": self.foundry.to_dict()}

    def graph_batch_sizes(self) -> List[int]:
        sizes = sorted(set(self.cuda_graph_bs or DEFAULT_CUDA_GRAPH_BS))
        cap = min(self.cuda_graph_max_bs or sizes[-1], self.max_num_seqs)
        return [s for s in sizes if s <= cap] or [1]

    def validate(self) -> None:
        """Raise ConfigError with one line for an impossible combination."""
        if self.tp < 1 or self.ep < 1:
            raise ConfigError("--tp and --ep must be >= 1")
        w = self.world_size
        if self.tp not in (1, w) or self.ep not in (1, w):
            raise ConfigError("--tp and --ep must each be 1 or equal to each other (world size = max(tp, ep))")
        if self.page_size < 1 or self.max_num_seqs < 1:
            raise ConfigError("--page-size and --max-running-requests must be >= 1")
        if self.num_kv_pages is not None and self.num_kv_pages < 2:
            raise ConfigError("--num-kv-pages must be >= 2 (page 0 is the padding page)")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError("--dtype must be auto, bfloat16, float16 or float32")
        if self.gpu_ids is not None and (len(self.gpu_ids) < self.world_size or min(self.gpu_ids) < 0):
            raise ConfigError(f"--gpu-ids needs {self.world_size} non-negative GPU indices (one per rank)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("--device must be auto, cpu or cuda")
