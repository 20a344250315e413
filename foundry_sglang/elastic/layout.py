"""Parallel layouts (TP x EP x replicas) and their validation against a model's shape.

A *layout* says how one deployment generation is laid out: every replica is one engine server with ``tp``
tensor-parallel and ``ep`` expert-parallel width. As in SGLang, EP runs over the TP ranks, so a replica has
``max(tp, ep)`` ranks and occupies that many slots (GPUs, or CPU slots in tests). Validation turns every bad
request into a :class:`LayoutError` with one clear line.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

from foundry_sglang import jsonsafe


class LayoutError(ValueError):
    """A reconfiguration request that cannot be served; the message is one line meant for the user."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    replicas: int = 1

    @property
    def slots_per_replica(self) -> int:
        return max(self.tp, self.ep)

    @property
    def slots(self) -> int:
        return self.slots_per_replica * self.replicas

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"tp={self.tp} ep={self.ep} replicas={self.replicas}"


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions that constrain parallel layouts."""

    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int = 0  # 0: dense model, EP must be 1


LAYOUT_KEYS = ("tp", "ep", "replicas")


def parse_layout(body: Any, current: Optional[Layout] = None) -> Layout:
    """Build a Layout from a request body (bytes, str or mapping). Keys left out keep the current value."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise LayoutError("request body is not UTF-8 text") from None
    if isinstance(body, str):
        try:
            body = jsonsafe.loads(body) if body.strip() else None
        except jsonsafe.MalformedJSON as exc:
            raise LayoutError(f"malformed JSON: {exc}") from None
    if not isinstance(body, Mapping):
        raise LayoutError('body must be a JSON object such as {"tp": 2, "ep": 1, "replicas": 1}')
    unknown = sorted(set(body) - set(LAYOUT_KEYS))
    if unknown:
        raise LayoutError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: tp, ep, replicas")
    if not body:
        raise LayoutError("give at least one of tp, ep, replicas")
    base = current or Layout()
    values = {}
    for key in LAYOUT_KEYS:
        value = body.get(key, getattr(base, key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"{key} must be a positive integer, got {json.dumps(value)}")
        values[key] = value
    return Layout(**values)


def validate_layout(layout: Layout, shape: Optional[ModelShape], slots: int, kind: str = "builtin") -> None:
    """Raise LayoutError when ``layout`` cannot run on ``slots`` slots or does not divide the model.

    ``kind`` is the worker kind: the built-in engine needs tp and ep each 1 or equal; SGLang needs ep | tp.
    """
    if kind == "builtin" and layout.tp > 1 and layout.ep > 1 and layout.tp != layout.ep:
        raise LayoutError(f"the built-in engine needs tp and ep each 1 or equal, got tp={layout.tp} ep={layout.ep}")
    if kind == "sglang" and layout.tp % layout.ep:
        raise LayoutError(f"SGLang runs EP inside the TP group: ep={layout.ep} must divide tp={layout.tp}")
    if layout.slots > slots:
        raise LayoutError(f"{layout} needs {layout.slots} slots (max(tp, ep) * replicas) "
                          f"but the deployment owns {slots}")
    if shape is None:
        return
    if shape.num_attention_heads % layout.tp:
        raise LayoutError(
            f"tp={layout.tp} does not divide the model's {shape.num_attention_heads} attention heads")
    if shape.num_key_value_heads % layout.tp:
        raise LayoutError(
            f"tp={layout.tp} does not divide the model's {shape.num_key_value_heads} key/value heads")
    if layout.ep > 1 and shape.num_experts == 0:
        raise LayoutError(f"ep={layout.ep} needs a mixture-of-experts model; this model is dense")
    if shape.num_experts and shape.num_experts % layout.ep:
        raise LayoutError(f"ep={layout.ep} does not divide the model's {shape.num_experts} experts")


def _shape_from_config(cfg: Mapping[str, Any]) -> ModelShape:
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_heads") or 0)
    if heads <= 0:
        raise LayoutError("model config has no num_attention_heads")
    kv = int(cfg.get("num_key_value_heads") or heads)
    experts = int(cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0)
    return ModelShape(heads, kv, experts)


def resolve_model_shape(model: str) -> ModelShape:
    """Read the head/expert counts of ``model``: a built-in preset (``builtin:NAME``) or a HF-style directory.

    The built-in presets live with the engine (``foundry_sglang.engine.config``, no torch import); a directory
    needs a config.json.
    """
    if model.startswith("builtin:"):
        from foundry_sglang.engine.config import ConfigError, builtin_config

        try:
            cfg = builtin_config(model)
        except ConfigError as exc:
            raise LayoutError(str(exc)) from None
        return ModelShape(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise LayoutError(f"cannot read the model shape: {path} not found")
    with open(path, "r", encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as exc:
            raise LayoutError(f"{path}: malformed JSON ({exc.msg})") from None
    if "text_config" in cfg and "num_attention_heads" not in cfg:
        cfg = cfg["text_config"]
    return _shape_from_config(cfg)
