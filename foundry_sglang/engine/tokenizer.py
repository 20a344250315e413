"""Tokenizers: a byte-level one for ``builtin:`` presets, HuggingFace ones for model directories.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``eos_token_id`` and
``apply_chat_template(messages) -> str`` (Qwen's ChatML when the tokenizer has no template of its own).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Optional, Sequence

log = logging.getLogger("foundry_sglang.engine")


def chatml(messages: Sequence[Dict[str, str]]) -> str:
    """Qwen-style ChatML prompt ending with the assistant turn header."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


class ByteTokenizer:
    """Ids 0..255 are bytes; 256.. are special tokens. Ids beyond those decode to nothing."""

    SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

    def __init__(self):
        self.special_ids = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.eos_token_id = self.special_ids["<|endoftext|>"]
        self.stop_token_ids = {self.eos_token_id, self.special_ids["<|im_end|>"]}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for piece in self._split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if i < self.vocab_size:
                out.append(self.SPECIALS[i - 256])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: Sequence[Dict[str, str]]) -> str:
        return chatml(messages)


class HFTokenizer:
    """transformers' AutoTokenizer when importable, else the bare ``tokenizers`` tokenizer.json."""

    def __init__(self, path: str, eos_token_id: Optional[int] = None):
        self._hf = None
        self._tok = None
        try:
            from transformers import AutoTokenizer
            self._hf = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers missing or the dir lacks its config files
            log.info("transformers tokenizer unavailable (%s); using tokenizers", e)
            from tokenizers import Tokenizer
            tj = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(tj):
                raise FileNotFoundError(f"{path}: no tokenizer.json") from None
            self._tok = Tokenizer.from_file(tj)
        eos = eos_token_id
        if eos is None and self._hf is not None:
            eos = self._hf.eos_token_id
        if eos is None and self._tok is not None:
            eos = self._tok.token_to_id("<|endoftext|>")
        self.eos_token_id = eos
        self.stop_token_ids = {t for t in (eos, self._token_id("<|im_end|>"), self._token_id("<|endoftext|>"))
                               if t is not None}

    def _token_id(self, s: str) -> Optional[int]:
        if self._hf is not None:
            i = self._hf.convert_tokens_to_ids(s)
            return i if isinstance(i, int) and i != self._hf.unk_token_id else None
        return self._tok.token_to_id(s)

    def encode(self, text: str) -> List[int]:
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False))
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=True)
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Dict[str, str]]) -> str:
        if self._hf is not None and getattr(self._hf, "chat_template", None):
            return self._hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return chatml(messages)


def load_tokenizer(model: str, tokenizer: Optional[str] = None, eos_token_id: Optional[int] = None):
    path = tokenizer or model
    if path.startswith("builtin:"):
        return ByteTokenizer()
    return HFTokenizer(path, eos_token_id)

