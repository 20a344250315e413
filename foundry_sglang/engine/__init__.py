"""Compact built-in serving engine: Qwen3 dense + MoE, TP/EP, paged KV, CUDA-graph decode, OpenAI server.

See README.md in this folder. Public API: EngineArgs, SamplingParams, LLM, LLMEngine, AsyncLLMEngine,
RequestOutput, ModelRunner.
"""
from .config import ConfigError, EngineArgs, ModelConfig  # noqa: F401
from .engine import LLM, AsyncLLMEngine, LLMEngine, RequestOutput  # noqa: F401
from .model_runner import ModelRunner  # noqa: F401
from .sampling import SamplingParams  # noqa: F401

__all__ = ["ConfigError", "EngineArgs", "ModelConfig", "LLM", "AsyncLLMEngine", "LLMEngine", "RequestOutput",
           "ModelRunner", "SamplingParams"]
