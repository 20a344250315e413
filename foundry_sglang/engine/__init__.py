"""Compact built-in serving engine: Qwen3 dense + MoE, TP/EP, paged KV, CUDA-graph decode, OpenAI server.

See README.md in this folder. Public API: EngineArgs, SamplingParams, LLM, LLMEngine, AsyncLLMEngine,
RequestOutput, ModelRunner. They are imported on first use: ``python -m foundry_sglang.engine`` reads its flags
and starts a Foundry LOAD before torch is imported.
"""
import importlib

__all__ = ["ConfigError", "EngineArgs", "ModelConfig", "LLM", "AsyncLLMEngine", "LLMEngine", "RequestOutput",
           "ModelRunner", "SamplingParams"]

_HOME = {"ConfigError": "config", "EngineArgs": "config", "ModelConfig": "config", "LLM": "engine",
         "AsyncLLMEngine": "engine", "LLMEngine": "engine", "RequestOutput": "engine", "ModelRunner": "model_runner",
         "SamplingParams": "sampling"}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOME))
