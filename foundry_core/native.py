"""Build and load the small native helper libraries in ``foundry_core/_native``.

The C files need only a C compiler and the CUDA driver API header (``cuda.h``); they are compiled on first use
into a per-user cache keyed by the source hash, so no build step is needed at install time and no NVCC.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from foundry_core.errors import NativeBuildError

log = logging.getLogger("foundry_core.native")

SOURCE_DIR = Path(__file__).with_name("_native")
_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


def cuda_include_dirs() -> list[str]:
    """Directories that may hold ``cuda.h`` (CUDA_HOME, /usr/local/cuda, pip's nvidia wheels)."""
    dirs = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            dirs.append(os.path.join(os.environ[env], "include"))
    dirs.append("/usr/local/cuda/include")
    for sp in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cu12/include"):
            p = os.path.join(sp, sub)
            if os.path.isdir(p):
                dirs.append(p)
    return [d for d in dict.fromkeys(dirs) if os.path.exists(os.path.join(d, "cuda.h"))]


def cache_dir() -> Path:
    root = os.environ.get("FOUNDRY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "foundry"
    )
    return Path(root)


def library_path(name: str, sources: list[str]) -> Path:
    """Compile ``sources`` (files in _native) into ``lib<name>-<hash>.so`` unless cached; return its path."""
    texts = [(SOURCE_DIR / s).read_bytes() for s in sources]
    headers = sorted(SOURCE_DIR.glob("*.h"))
    digest = hashlib.sha256(b"".join(texts + [h.read_bytes() for h in headers])).hexdigest()[:16]
    out = cache_dir() / f"lib{name}-{digest}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise NativeBuildError("no C compiler found (set CC) to build foundry's native helper")
    incs = cuda_include_dirs()
    if not incs:
        raise NativeBuildError("cuda.h not found (set CUDA_HOME) to build foundry's native helper")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, "-O2", "-shared", "-fPIC", "-std=gnu11", "-Wall", f"-I{SOURCE_DIR}"]
    cmd += [f"-I{d}" for d in incs] + [str(SOURCE_DIR / s) for s in sources] + ["-o", tmp, "-ldl", "-lpthread"]
    log.debug("building %s: %s", name, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise NativeBuildError(f"cannot run the C compiler {cc!r}: {e.strerror}") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        first = (proc.stderr.strip().splitlines() or ["?"])[0]
        raise NativeBuildError(f"building native helper {name} failed: {first}")
    os.replace(tmp, out)
    return out


def load(name: str, sources: list[str]) -> ctypes.CDLL:
    """Build if needed and dlopen the library (once per process)."""
    with _lock:
        if name not in _loaded:
            path = library_path(name, sources)
            _loaded[name] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            _loaded[name]._foundry_path = str(path)
        return _loaded[name]
