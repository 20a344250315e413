"""Sampling parameters and a batched, reproducible sampler.

Random draws come from a counter-based hash of (request seed, step, token id), not from a shared generator, so a
seeded request samples the same tokens whatever else is in its batch and on any device.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

#: Bounds a request must keep so that one request cannot overflow the sampler or slow every batch.
MAX_INT = 2 ** 31 - 1
MAX_SEED = 2 ** 63 - 1
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 256


class InvalidParam(ValueError):
    """A request field out of its range (one line); ``param`` names the field as the client spelled it."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    """temperature 0 is greedy. ``stop`` strings end generation (excluded from the text)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidParam with one line for a value out of range."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_INT:
            raise InvalidParam("max_tokens must be a positive integer", "max_tokens")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidParam("temperature must be a number in [0, 100]", "temperature")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidParam("top_p must be a number in (0, 1]", "top_p")
        if not _is_int(self.top_k) or not (self.top_k == -1 or 1 <= self.top_k <= MAX_INT):
            raise InvalidParam(f"top_k must be -1 or an integer in [1, {MAX_INT}]", "top_k")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidParam("seed must be an integer in [0, 2**63-1]", "seed")
        if (not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop)
                or len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in self.stop)):
            raise InvalidParam(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                               f"of at most {MAX_STOP_CHARS} characters", "stop")
        if (not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS
                or not all(_is_int(t) and 0 <= t <= MAX_INT for t in self.stop_token_ids)):
            raise InvalidParam(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids "
                               f"(integers in [0, {MAX_INT}])", "stop_token_ids")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParam("ignore_eos must be a boolean", "ignore_eos")

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else random.getrandbits(31)


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uniforms in (0, 1) determined by (seed, step, column)."""
    col = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    row = _mix32((seeds.long() & _M32) ^ _mix32((steps.long() * 0x9E3779B1) & _M32))
    x = _mix32((row[:, None] + col[None, :] * 0x27D4EB2F) & _M32)
    return (x.double() + 0.5) / 4294967296.0


def sample(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
           top_ks: Sequence[int], seeds: Sequence[int], steps: Sequence[int]) -> List[int]:
    """One token per row of float32 logits [B, V]. Raises when a row's parameters do not fit (the engine then
    samples row by row to find and fail only that request)."""
    B, V = logits.shape
    dev = logits.device
    greedy = logits.argmax(-1)
    if all(t == 0 for t in temperatures):
        return greedy.tolist()
    temp = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=dev, dtype=torch.float32)
    probs = (logits / temp[:, None]).softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    cum = sorted_p.cumsum(-1)
    top_p = torch.tensor(list(top_ps), device=dev, dtype=torch.float32)
    keep = (cum - sorted_p) < top_p[:, None]                      # always keeps the most likely token
    k = torch.tensor([min(kk, V) if kk > 0 else V for kk in top_ks], device=dev)
    keep &= torch.arange(V, device=dev)[None, :] < k[:, None]
    sorted_p = sorted_p * keep
    filtered = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i / sum(p).
    u = hashed_uniform(torch.tensor(list(seeds), device=dev), torch.tensor(list(steps), device=dev), V)
    choice = (filtered.double() / (-torch.log(u))).argmax(-1)
    is_greedy = torch.tensor([t == 0 for t in temperatures], device=dev)
    return torch.where(is_greedy, greedy, choice).tolist()
