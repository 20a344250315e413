"""The one layer between foundry_core and every engine (the built-in engine, the SGLang plugin, elastic workers).

* :mod:`~foundry_sglang.graphs.settings`: :class:`FoundryMode` (and its one strictness rule), :class:`FoundryConfig`,
  their defaults and flags (``add_foundry_flags``), and every ``FOUNDRY_*`` setting;
* :mod:`~foundry_sglang.graphs.keys`: :class:`RankLayout` -> archive key, file name and directory;
* :mod:`~foundry_sglang.graphs.router`: :class:`GraphRouter`, the SAVE/LOAD decisions and the one fallback policy.

Engine adapters only translate between their engine's graph backend and these; foundry_core never imports them.
"""
from foundry_sglang.graphs.keys import ArchiveKey, RankLayout, archive_key, layout_dir
from foundry_sglang.graphs.router import FALLBACK_ERRORS, GraphRouter, Route, shape_key_name
from foundry_sglang.graphs.settings import FoundryConfig, FoundryMode

__all__ = [
    "FALLBACK_ERRORS", "ArchiveKey", "FoundryConfig", "FoundryMode", "GraphRouter", "RankLayout", "Route",
    "archive_key", "layout_dir", "shape_key_name",
]
