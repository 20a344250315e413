"""Compact built-in serving engine: Qwen3 dense + MoE, TP/EP, paged KV, CUDA-graph decode, OpenAI server.

See README.md in this folder. Public API: EngineArgs, SamplingParams, LLM, LLMEngine, AsyncLLMEngine,
RequestOutput, ModelRunner.
"""
from .config import ConfigError, EngineArgs, ModelConfig
from .engine import LLM, AsyncLLMEngine, LLMEngine, RequestOutput
from .model_runner import ModelRunner
from .sampling import SamplingParams

__all__ = ["ConfigError", "EngineArgs", "ModelConfig", "LLM", "AsyncLLMEngine", "LLMEngine", "RequestOutput",
           "ModelRunner", "SamplingParams"]
