"""Archive keys and paths: one scheme for the built-in engine, the SGLang plugin and elastic deployments.

A CUDA graph bakes in kernel choices, tensor shapes and device addresses. Each engine adapter gathers what shapes
its graphs (model identity, graph-relevant arguments, machine facts) into a JSON-able ``material`` mapping;
:func:`archive_key` adds the :class:`RankLayout` and turns it into an :class:`ArchiveKey`: a readable file name
that still ends in a short hash (two configurations never overwrite each other) and a ``"<engine>:<sha256>"`` key
that foundry_core stores in the archive's fingerprint and compares verbatim at LOAD.

The layout is split into a rank-free part (sizes: ``tp2-ep2``) and an optional rank part (``tp2r1-ep2r1``).
Per-rank archives (the default) hash both; rank-free template archives (one archive serving every rank of a
layout, once comm_patch re-points rank-dependent arguments at LOAD) pass ``per_rank=False``. Elastic deployments
keep one directory per layout (:func:`layout_dir`); the engines name files inside it with :func:`archive_key`.
Pure Python; the machine facts are injectable for tests.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import foundry_core
from foundry_core.fingerprint import current_fingerprint

__all__ = [
    "ArchiveKey", "RankLayout", "archive_key", "describe_difference", "jsonable", "layout_dir", "machine_facts",
    "model_identity", "slug",
]

log = logging.getLogger("foundry_sglang.graphs.keys")

KEY_SCHEMA = 2  # bump when the material's shape changes: old archives then stop matching (and are re-saved)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_DIMS = ("tp", "ep", "dp", "pp")


@dataclass(frozen=True)
class RankLayout:
    """Where one process sits in the parallel layout: sizes (shared by all ranks) and this process's ranks."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0

    def sizes(self) -> dict[str, int]:
        return {f"{d}_size": getattr(self, f"{d}_size") for d in _DIMS}

    def ranks(self) -> dict[str, int]:
        return {f"{d}_rank": getattr(self, f"{d}_rank") for d in _DIMS}

    def layout_tag(self) -> str:
        """The rank-free name of the layout: ``tp2``, ``tp2-ep2``, ``tp1-dp2`` (sizes of 1 beyond TP omitted)."""
        return "-".join(f"{d}{getattr(self, f'{d}_size')}" for d in _DIMS
                        if d == "tp" or getattr(self, f"{d}_size") > 1)

    def tag(self) -> str:
        """This rank's name: ``tp2r1``, ``tp2r1-ep2r1`` (sizes of 1 beyond TP omitted)."""
        return "-".join(f"{d}{getattr(self, f'{d}_size')}r{getattr(self, f'{d}_rank')}" for d in _DIMS
                        if d == "tp" or getattr(self, f"{d}_size") > 1)


@dataclass(frozen=True)
class ArchiveKey:
    """An archive: ``file_name`` inside the archive directory, ``key`` for the archive fingerprint."""

    file_name: str
    key: str  # "<engine>:" + sha256 hex of ``material``
    material: str  # canonical JSON of everything hashed (stored in the manifest's extra for inspection)

    def path(self, archive_dir: str | os.PathLike) -> Path:
        return Path(archive_dir) / self.file_name


def archive_key(engine: str, model: str, material: Mapping[str, Any], layout: RankLayout,
                per_rank: bool = True) -> ArchiveKey:
    """The one key function. ``engine`` prefixes the key (``sglang``, ``builtin``); ``model`` names the file;
    ``material`` is everything besides the layout that shapes the graphs; ``per_rank=False`` leaves the ranks out
    of both the hash and the name (a rank-free template archive)."""
    doc = {"schema": KEY_SCHEMA, "engine": engine, **jsonable(dict(material)), "layout": layout.sizes(),
           "rank": layout.ranks() if per_rank else None}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    stem = slug(Path(str(model).rstrip("/")).name or "model")
    tag = layout.tag() if per_rank else layout.layout_tag()
    return ArchiveKey(file_name=f"{stem}-{tag}-{digest[:12]}.foundry", key=f"{engine}:{digest}", material=text)


def layout_dir(root: str | os.PathLike, model: str, layout: RankLayout) -> Path:
    """Directory of one model's archives for one layout (elastic deployments: one per generation layout)."""
    return Path(root) / slug(Path(str(model).rstrip("/")).name or "model") / layout.layout_tag()


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


def machine_facts(device: int = 0) -> dict[str, str]:
    """GPU name, compute capability, driver and library versions of this machine ("none" without a GPU)."""
    facts = {"sglang": _dist_version("sglang"), "foundry": _foundry_version()}
    try:
        fp = current_fingerprint("", device)
        facts.update(gpu=fp.gpu_name, capability=fp.compute_capability, driver=str(fp.driver_version),
                     cuda_runtime=fp.cuda_runtime, torch=fp.torch, triton=fp.triton)
    except Exception as err:  # no GPU (CPU CI) or no driver: still a valid, distinct key
        import torch

        facts.update(gpu="none", capability="", driver="", cuda_runtime=torch.version.cuda or "",
                     torch=torch.__version__, triton=_dist_version("triton"))
        log.debug("no GPU facts for the archive key: %s", err)
    return facts


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


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types; objects JSON has no type for (enums, dataclasses) by their ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return repr(value)  # enums, dataclasses (e.g. CudaGraphConfig): their repr lists every field


def slug(name: str) -> str:
    """``name`` made safe for a file name (the one slug helper)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:64] or "model"


# -- helpers ---------------------------------------------------------------------------------------
def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _dist_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _foundry_version() -> str:
    return foundry_core.__version__
