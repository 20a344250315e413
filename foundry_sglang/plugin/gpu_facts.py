"""What every GPU of this node is, read from NVML without starting CUDA.

SGLang modules ask torch for the GPU's name and compute capability while they are imported (0.5.17: e.g.
``srt/layers/communicator.py`` calls ``is_sm90_supported()``; 0.5.23: ``sglang/__init__`` asks for the device
name), and torch answers those by initialising CUDA. The standby's forkserver must not initialise CUDA, so it
answers them from here instead (:mod:`.forkserver`); that is only right where every GPU of the node is the same
kind, which :func:`node_gpu` checks.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional, Tuple

#: NVML's maximum device-name length (``NVML_DEVICE_NAME_V2_BUFFER_SIZE``).
_NAME_BYTES = 96

GpuKind = Tuple[str, Tuple[int, int]]


def node_gpu(library: str = "libnvidia-ml.so.1") -> Optional[GpuKind]:
    """(name, (major, minor)) shared by every GPU of this node, or None: no NVML (no driver, a CPU machine),
    no GPU, GPUs of different kinds, MIG instances among the visible devices (their names and counts are not
    the node's), or any NVML call failing. Never raises: the forkserver calls it while it imports."""
    if "MIG" in os.environ.get("CUDA_VISIBLE_DEVICES", ""):
        return None
    try:
        nvml = ctypes.CDLL(library)
        init, shutdown = nvml.nvmlInit_v2, nvml.nvmlShutdown
    except (OSError, AttributeError):   # no driver, or one too old for these calls
        return None
    if init() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
            return None
        kinds = set()
        for index in range(count.value):
            handle = ctypes.c_void_p()
            name = ctypes.create_string_buffer(_NAME_BYTES)
            major, minor = ctypes.c_int(), ctypes.c_int()
            if (nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0
                    or nvml.nvmlDeviceGetName(handle, name, _NAME_BYTES) != 0
                    or nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0):
                return None
            kinds.add((name.value.decode(errors="replace"), (major.value, minor.value)))
        return kinds.pop() if len(kinds) == 1 else None
    except Exception:  # noqa: BLE001 - a missing or failing NVML call: no answers (the caller must live)
        return None
    finally:
        shutdown()
