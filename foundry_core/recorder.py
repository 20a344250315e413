"""Record the module images a process loads (CUPTI), so SAVE can archive the kernels its graphs use.

``recorder = ImageRecorder(); recorder.start()`` **before anything touches CUDA** (before ``import torch``
initialises a device, before any other library creates a context). CUPTI then reports every module image the
process loads - ATen, cuBLASLt, cuDNN, Triton - and the recorder keeps a copy of each. Images loaded before
``start()`` are missed; ``start()`` warns when it can tell that CUDA was already initialised. SAVE then ties graph
kernels to these images (:mod:`foundry_core.images`) and ``recorder.stop()`` frees CUPTI for profilers.

Only one CUPTI subscriber may exist per process: a profiler that uses CUPTI (torch.profiler/Kineto,
Nsight Systems/Compute, cuda-gdb) cannot run while the recorder is started, and vice versa.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from foundry_core import native
from foundry_core.errors import DeviceUnavailable, FoundryError
from foundry_core.fingerprint import gpu_unavailable_reason
from foundry_core.options import ENV, Options

__all__ = ["CapturedImage", "ImageCaptureError", "ImageRecorder", "ModuleGlobal", "find_libcupti"]

log = logging.getLogger("foundry_core.recorder")

class ImageCaptureError(FoundryError):
    """The module-image recorder cannot run (no libcupti, CUPTI held by another tool, ...)."""


@dataclass(frozen=True)
class CapturedImage:
    """One distinct module image seen by the recorder."""

    data: bytes
    module_id: int  # CUPTI id of the first module that loaded these bytes
    order: int  # sequence number of that load among all module events
    loads: int = 1  # modules that loaded these bytes while recording
    unloads: int = 0  # of those, how many were unloaded again
    seen_at_unload: bool = False  # loaded before start(); its bytes were caught at unload
    index: int = -1  # position in the recorder's list

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ModuleGlobal:
    """A module-scope variable (``__device__``/``__constant__``) whose address host code asked the driver for."""

    name: str  # symbol name, as passed to cuModuleGetGlobal / cuLibraryGetGlobal
    address: int
    size: int
    handle: int  # the CUmodule or CUlibrary it was asked of
    via_library: bool  # cuLibraryGetGlobal (True) or cuModuleGetGlobal_v2 (False)


def find_libcupti(configured: Optional[str] = None) -> str:
    """Path of a usable libcupti: ``configured`` (``Options.libcupti``), the nvidia pip wheels, then the CUDA
    toolkit."""
    if configured:
        if not os.path.exists(configured):
            raise ImageCaptureError(f"{ENV['libcupti']}={configured} does not exist")
        return configured
    patterns = []
    for sp in native.site_dirs():  # never the working directory: a library found there would run here
        patterns += [
            os.path.join(sp, "nvidia", "cu13", "lib", "libcupti.so*"),
            os.path.join(sp, "nvidia", "cuda_cupti", "lib", "libcupti.so*"),
            os.path.join(sp, "nvidia", "cu12", "lib", "libcupti.so*"),
        ]
    for home in native.cuda_homes():
        patterns += [os.path.join(home, "extras", "CUPTI", "lib64", "libcupti.so*"),
                     os.path.join(home, "lib64", "libcupti.so*"), os.path.join(home, "lib", "libcupti.so*")]
    for pattern in patterns:
        hits = sorted(glob.glob(pattern), key=len)  # libcupti.so.13 before libcupti.so.2025.x.y
        if hits:
            return hits[0]
    raise ImageCaptureError(
        "libcupti not found: install torch's nvidia wheels (nvidia/cu13/lib/libcupti.so.13) or the CUDA toolkit's "
        "extras/CUPTI, or set FOUNDRY_LIBCUPTI to its path"
    )


#: foundry_cupti_cuda_state() values
CUDA_NOT_LOADED, CUDA_NOT_INITIALISED, CUDA_INITIALISED, CUDA_CONTEXT_ACTIVE = 0, 1, 2, 3


class ImageRecorder:
    """Keeps a copy of every module image loaded while it is started (process-wide; CUPTI allows one).

    Start it before any CUDA work in the process. ``images()`` may be called at any time and returns the
    distinct images seen so far, in load order. ``options``: which libcupti, and where the recorder's native
    library is built; default ``Options.from_env()`` (read when first needed: a process may record images before
    it makes a Session).
    """

    def __init__(self, options: Optional[Options] = None):
        self._options = options

    @property
    def options(self) -> Options:
        if self._options is None:
            self._options = Options.from_env()
        return self._options

    def _lib(self):
        return native.cupti_lib(self._options)

    def start(self, libcupti_path: str | None = None, warn_if_late: bool = True) -> "ImageRecorder":
        """Subscribe to CUPTI module callbacks. Raises ImageCaptureError with the reason if it cannot
        (DeviceUnavailable when CUPTI refuses because there is no usable CUDA device).

        ``warn_if_late=False``: the caller knows that no kernel has run yet in this process even if CUDA is
        initialised (modules load lazily, at their first launch), so nothing can have been missed."""
        lib = native.cupti_lib(self.options)
        if lib.foundry_cupti_active():
            return self
        if warn_if_late:
            self._warn_if_cuda_started(lib)
        path = libcupti_path or find_libcupti(self.options.libcupti)
        err = ctypes.create_string_buffer(512)
        rc = lib.foundry_cupti_start(path.encode(), err, len(err))
        if rc > 0 and (no_gpu := gpu_unavailable_reason()) is not None:  # CUPTI says only CUPTI_ERROR_UNKNOWN
            raise DeviceUnavailable(f"no usable CUDA device: {no_gpu}")
        if rc != 0:
            raise ImageCaptureError(f"cannot record kernel images: {err.value.decode(errors='replace')}")
        log.info("recording module images through %s%s", path,
                 "" if lib.foundry_cupti_driver_callbacks() else " (no cuModuleLoad pairing)")
        return self

    @staticmethod
    def _warn_if_cuda_started(lib: ctypes.CDLL) -> None:
        torch = sys.modules.get("torch")
        torch_started = bool(torch is not None and hasattr(torch, "cuda") and torch.cuda.is_initialized())
        state = lib.foundry_cupti_cuda_state()
        if torch_started or state == CUDA_CONTEXT_ACTIVE:
            msg = ("ImageRecorder started after CUDA was initialised in this process "
                   f"({'torch.cuda is initialised' if torch_started else 'a CUDA context is active'}): module images "
                   "loaded before now are MISSED and graphs using them cannot be saved. Start the recorder before any "
                   "CUDA work (before torch.cuda initialises).")
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        elif state == CUDA_INITIALISED:
            log.warning("ImageRecorder started after cuInit: modules loaded in other contexts before now are missed")

    def stop(self) -> None:
        """Unsubscribe from CUPTI (keeps the recorded images). Lets profilers use CUPTI again."""
        lib = self._lib()
        err = ctypes.create_string_buffer(512)
        if lib.foundry_cupti_stop(err, len(err)) != 0:
            log.warning("%s", err.value.decode(errors="replace"))

    @property
    def active(self) -> bool:
        return bool(self._lib().foundry_cupti_active())

    def stats(self) -> dict[str, int]:
        """{"images", "bytes", "events", "out_of_memory"} counters."""
        count, total, events, oom = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_int()
        self._lib().foundry_cupti_stats(ctypes.byref(count), ctypes.byref(total), ctypes.byref(events),
                                        ctypes.byref(oom))
        return {"images": count.value, "bytes": total.value, "events": events.value, "out_of_memory": oom.value}

    def images(self) -> list[CapturedImage]:
        """Copies of the distinct images recorded so far, in load order."""
        lib = self._lib()
        stats = self.stats()
        if stats["out_of_memory"]:
            raise ImageCaptureError("the image recorder ran out of host memory: some module images were not kept")
        out = []
        for i in range(stats["images"]):
            size, mid, order = ctypes.c_uint64(), ctypes.c_uint32(), ctypes.c_uint64()
            loads, unloads, at_unload = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_int()
            if lib.foundry_cupti_image_info(i, ctypes.byref(size), ctypes.byref(mid), ctypes.byref(order),
                                            ctypes.byref(loads), ctypes.byref(unloads), ctypes.byref(at_unload)):
                break
            buf = ctypes.create_string_buffer(size.value)
            if lib.foundry_cupti_image_copy(i, buf, size.value) != size.value:
                raise ImageCaptureError(f"recorded image {i} changed while being copied")
            out.append(CapturedImage(data=buf.raw, module_id=mid.value, order=order.value, loads=loads.value,
                                     unloads=unloads.value, seen_at_unload=bool(at_unload.value), index=i))
        return out

    def module_images(self) -> dict[int, int]:
        """CUmodule handle -> index into :meth:`images` for live modules whose load call was observed."""
        lib = self._lib()
        out = {}
        for i in range(lib.foundry_cupti_module_count()):
            mid, image, handle = ctypes.c_uint32(), ctypes.c_uint64(), ctypes.c_uint64()
            if lib.foundry_cupti_module_info(i, ctypes.byref(mid), ctypes.byref(image), ctypes.byref(handle)) == 0:
                if handle.value:
                    out[handle.value] = image.value
        return out

    def globals(self) -> list[ModuleGlobal]:
        """Module-scope variables whose address the driver handed to host code while recording
        (cuModuleGetGlobal_v2 / cuLibraryGetGlobal, which cudaGetSymbolAddress and cudaMemcpyToSymbol use)."""
        lib = self._lib()
        out = []
        name = ctypes.create_string_buffer(1024)
        for i in range(lib.foundry_cupti_global_count()):
            address, size, handle, via = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_int()
            if lib.foundry_cupti_global_info(i, ctypes.byref(address), ctypes.byref(size), ctypes.byref(handle),
                                             ctypes.byref(via), name, len(name)) == 0:
                out.append(ModuleGlobal(name.value.decode(errors="surrogateescape"), address.value, size.value,
                                        handle.value, bool(via.value)))
        return out

    @property
    def records_globals(self) -> bool:
        """Whether the get-global callbacks are enabled (else :meth:`globals` stays empty)."""
        return bool(self._lib().foundry_cupti_global_callbacks())

    def clear(self) -> None:
        """Forget all recorded images."""
        self._lib().foundry_cupti_clear()

    def __enter__(self) -> "ImageRecorder":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
