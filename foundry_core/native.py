"""foundry_core's one boundary to native code: build and load the small helper libraries in
``foundry_core/_native`` and declare their C signatures, and call the CUDA driver through cuda.bindings.

The C files need only a C compiler and the CUDA driver API header (``cuda.h``); they are compiled on first use
into a private per-user directory (``Options.cache_dir``/native: 0700, refused if anyone else can write it), keyed
by the source hash, so no build step is needed at install time and no NVCC. The build is an entry point of its
own: :func:`library_path`, :func:`load`, :func:`native_lib` and :func:`cupti_lib` take an ``Options`` and read
``Options.from_env()`` without one (the first load of each library decides where it is built). A built library is
loaded only if its sha256 is the one recorded when it was built; anything else found under its name is rebuilt,
never run.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import site
import stat
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Optional

from foundry_core.errors import DriverError, FoundryError, NativeBuildError
from foundry_core.options import Options

log = logging.getLogger("foundry_core.native")

SOURCE_DIR = Path(__file__).with_name("_native")
_loaded: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


def site_dirs() -> list[str]:
    """The interpreter's own package directories (site-packages of its environment and of the user), absolute: with
    CUDA_HOME, the only places foundry takes NVIDIA's headers and libraries from. Never ``sys.path`` as such: it
    holds the working directory ('' or its absolute path), and whoever can write there would choose the code
    foundry compiles or loads."""
    dirs = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")] + list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isabs(d)]


def cuda_homes() -> list[str]:
    """CUDA_HOME, CUDA_PATH (absolute paths only: a relative one would mean the working directory), then
    /usr/local/cuda."""
    homes = [os.environ.get(env, "") for env in ("CUDA_HOME", "CUDA_PATH")]
    return [h for h in dict.fromkeys(homes) if os.path.isabs(h)] + ["/usr/local/cuda"]


def cuda_include_dirs() -> list[str]:
    """Directories that hold ``cuda.h``: under :func:`cuda_homes`, then pip's nvidia wheels in :func:`site_dirs`."""
    dirs = [os.path.join(home, "include") for home in cuda_homes()]
    for sp in site_dirs():
        dirs += [os.path.join(sp, sub) for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include",
                                                   "nvidia/cu12/include")]
    return [d for d in dict.fromkeys(dirs) if os.path.isfile(os.path.join(d, "cuda.h"))]


def c_compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def private_dir(cache_dir: Path) -> Path:
    """``cache_dir/native``: created 0700; refused unless it is a real directory of this user that nobody else
    can write (whoever can write there chooses the code this process runs)."""
    directory = Path(cache_dir) / "native"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError as e:
        raise NativeBuildError(f"cannot create foundry's native cache {directory}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NativeBuildError(f"foundry's native cache {directory} is not a directory (a symlink?); remove it")
    if st.st_uid != os.geteuid():
        raise NativeBuildError(f"foundry's native cache {directory} belongs to uid {st.st_uid}, not this user; "
                               "set FOUNDRY_CACHE to a directory of your own")
    if st.st_mode & 0o022:
        raise NativeBuildError(f"foundry's native cache {directory} is writable by other users "
                               f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 700 {directory}` or set FOUNDRY_CACHE")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _trusted(path: Path) -> bool:
    """``path`` is a regular file of this user, writable by nobody else, whose sha256 is the one recorded when
    foundry built it (in ``PATH.sha256``, in the same private directory)."""
    try:
        st = os.lstat(path)
        recorded = path.with_name(path.name + ".sha256").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return False
    return _sha256(path) == recorded


def library_path(name: str, sources: list[str], rebuild: bool = False, options: Optional[Options] = None) -> Path:
    """Compile ``sources`` (files in _native) into ``lib<name>-<hash>.so`` in :func:`private_dir` of
    ``options.cache_dir`` (default ``Options.from_env()``) unless a trusted build is there already; return its path.
    A file that fails :func:`_trusted` is rebuilt, never loaded."""
    texts = [(SOURCE_DIR / s).read_bytes() for s in sources]
    headers = sorted(SOURCE_DIR.glob("*.h"))
    digest = hashlib.sha256(b"".join(texts + [h.read_bytes() for h in headers])).hexdigest()[:16]
    directory = private_dir((options if options is not None else Options.from_env()).cache_dir)
    out = directory / f"lib{name}-{digest}.so"
    if not rebuild and _trusted(out):
        return out
    if out.exists() or out.is_symlink():
        log.warning("foundry: %s is not the library foundry built (hash, owner or mode differ); rebuilding", out)
    cc = c_compiler()
    if not cc:
        raise NativeBuildError("no C compiler found (set CC) to build foundry's native helper")
    incs = cuda_include_dirs()
    if not incs:
        raise NativeBuildError("cuda.h not found (set CUDA_HOME) to build foundry's native helper")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
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
    os.chmod(tmp, 0o700)
    fd, tmp_sum = tempfile.mkstemp(suffix=".sha256", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(_sha256(Path(tmp)) + "\n")
    os.replace(tmp_sum, out.with_name(out.name + ".sha256"))
    os.replace(tmp, out)
    return out


def load(name: str, sources: list[str], options: Optional[Options] = None) -> ctypes.CDLL:
    """Build if needed, check the file once more, and dlopen the library (once per process; ``options``: see
    :func:`library_path`, read only by the first load)."""
    with _lock:
        if name not in _loaded:
            options = options if options is not None else Options.from_env()
            path = library_path(name, sources, options=options)
            if not _trusted(path):  # another process replaced it between our build or check and now
                path = library_path(name, sources, rebuild=True, options=options)
                if not _trusted(path):
                    raise NativeBuildError(f"{path} changed while foundry was loading it; not loading it")
            _loaded[name] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            _loaded[name]._foundry_path = str(path)
        return _loaded[name]


# ---------------------------------------------------------------------------------------------------------------
# The libraries and their C signatures (every ctypes declaration of foundry_core lives here)
# ---------------------------------------------------------------------------------------------------------------
#: arena.c (the VMM arena PyTorch allocates from), restore.c (the graph check and rebuild loop), driver.c
FOUNDRY_SOURCES = ["driver.c", "arena.c", "restore.c", "kernels.c"]
#: cupti_capture.c (the module-image recorder); CUPTI_ABI must equal its foundry_cupti_abi()
CUPTI_SOURCES = ["cupti_capture.c"]
CUPTI_ABI = 2


def _declare(lib: ctypes.CDLL, signatures: dict) -> None:
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def native_lib(options: Optional[Options] = None) -> ctypes.CDLL:
    """``libfoundry_native``: the arena and the graph check/rebuild loop, with its C signatures declared
    (``options``: see :func:`load`)."""
    lib = load("foundry_native", FOUNDRY_SOURCES, options)
    if not getattr(lib, "_foundry_typed", False):
        u64, u32, c_int, p, text, size = (ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p,
                                          ctypes.c_char_p, ctypes.c_size_t)
        tables = [p, u32, p, p, p, u32, p, p, p]  # see restore.NativeTables.pointers
        _declare(lib, {
            "foundry_arena_init": (c_int, [u64, u64, c_int, ctypes.POINTER(u64)]),
            "foundry_arena_error": (text, []),
            "foundry_arena_map": (c_int, [u64, u64]),
            "foundry_arena_advance": (c_int, [u64]),
            "foundry_arena_base": (u64, []),
            "foundry_arena_size": (u64, []),
            "foundry_arena_granularity": (u64, []),
            "foundry_arena_cursor": (u64, []),
            "foundry_arena_trace_len": (u64, []),
            "foundry_arena_trace_copy": (u64, [p, u64, u64]),
            "foundry_sizeof_memcpy3d": (size, []),
            "foundry_check_graph": (c_int, tables + [p, text, size]),
            "foundry_build_graph": (c_int, tables + [p, text, size, p, u32, p]),
            "foundry_instantiate": (c_int, [p, p, p, text, size]),
            "foundry_launch": (c_int, [p, p]),
            "foundry_exec_destroy": (c_int, [p]),
            "foundry_graph_destroy": (c_int, [p]),
            "foundry_graph_edges": (c_int, [p, p, p, p, ctypes.POINTER(size)]),
            "foundry_split_node": (c_int, [p, p, p, text, size]),
            "foundry_load_kernels": (c_int, [u32, p, p, u32, p, p, p, p, p, c_int, p, p, text, size]),
        })
        lib._foundry_typed = True
    return lib


def cupti_lib(options: Optional[Options] = None) -> ctypes.CDLL:
    """``libfoundry_cupti``: the module-image recorder, with its C signatures declared (``options``: see
    :func:`load`); NativeBuildError when the loaded build does not speak :data:`CUPTI_ABI`."""
    lib = load("foundry_cupti", CUPTI_SOURCES, options)
    if not getattr(lib, "_foundry_typed", False):
        u64, u32, c_int, ptr, text, size = (ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int, ctypes.POINTER,
                                            ctypes.c_char_p, ctypes.c_size_t)
        _declare(lib, {
            "foundry_cupti_abi": (c_int, []),
            "foundry_cupti_cuda_state": (c_int, []),
            "foundry_cupti_start": (c_int, [text, text, size]),
            "foundry_cupti_stop": (c_int, [text, size]),
            "foundry_cupti_active": (c_int, []),
            "foundry_cupti_driver_callbacks": (c_int, []),
            "foundry_cupti_stats": (None, [ptr(u64), ptr(u64), ptr(u64), ptr(c_int)]),
            "foundry_cupti_image_info": (c_int, [u64, ptr(u64), ptr(u32), ptr(u64), ptr(u32), ptr(u32), ptr(c_int)]),
            "foundry_cupti_image_copy": (ctypes.c_int64, [u64, ctypes.c_void_p, u64]),
            "foundry_cupti_module_count": (u64, []),
            "foundry_cupti_module_info": (c_int, [u64, ptr(u32), ptr(u64), ptr(u64)]),
            "foundry_cupti_clear": (None, []),
            "foundry_cupti_inject": (None, [u32, text, u64, c_int, u64]),
            "foundry_cupti_global_callbacks": (c_int, []),
            "foundry_cupti_global_count": (u64, []),
            "foundry_cupti_global_info": (c_int, [u64, ptr(u64), ptr(u64), ptr(u64), ptr(c_int), text, u64]),
            "foundry_cupti_inject_global": (None, [text, u64, u64, u64, c_int]),
        })
        if lib.foundry_cupti_abi() != CUPTI_ABI:
            raise NativeBuildError(f"native recorder ABI {lib.foundry_cupti_abi()} != {CUPTI_ABI}: stale build")
        lib._foundry_typed = True
    return lib


# ---------------------------------------------------------------------------------------------------------------
# CUDA driver calls through cuda.bindings (one wrapper for every module)
# ---------------------------------------------------------------------------------------------------------------
def driver():
    """``cuda.bindings.driver``; FoundryError naming the missing package when it is not installed."""
    try:
        from cuda.bindings import driver as drv
    except ImportError as err:
        raise FoundryError(f"cuda-bindings (cuda.bindings) is required: {err}") from None
    return drv


def check(result, what: str):
    """The values of a cuda.bindings result ``(status, *values)`` (one value bare, several as a tuple, none as
    None), or a one-line :class:`DriverError` naming ``what`` and the status."""
    status, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(status) != 0:
        name = getattr(status, "name", str(int(status)))
        raise DriverError(f"{what} failed: {name}", name)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def call(what: str, fn, *args):
    """``check(fn(*args), what)``; an exception raised by the binding itself (no driver library, a wrong handle
    type) also becomes a one-line DriverError."""
    try:
        result = fn(*args)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DriverError(f"{what} failed: {first}") from None
    return check(result, what)
