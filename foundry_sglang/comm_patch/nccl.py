"""LOAD on a real rank: fill each slot by capturing the collective on the live NCCL communicator.

``NcclSlotFiller`` issues ``ncclAllReduce``/``ncclAllGather`` directly on the communicator that torch.distributed
created for the default process group (``ProcessGroupNCCL._comm_ptr()``), on the stream that
``foundry_core.slots.fill_slots`` is capturing into the restored graph — the same NCCL call torch makes for
``dist.all_reduce``/``dist.all_gather_into_tensor`` inside a live capture, without torch's cross-stream events.
Every rank fills the same slots in the same order, so the captured collectives match across ranks.

``TorchSlotFiller`` is the fallback where the communicator pointer is not exposed: it calls torch.distributed
under the capture.
"""
from __future__ import annotations

import ctypes
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from foundry_core import schema
from foundry_core.errors import FoundryError
from foundry_core.restore import tensor_at

__all__ = ["NcclSlotFiller", "TorchSlotFiller", "make_slot_filler"]

log = logging.getLogger("foundry_sglang.comm_patch")

# ncclDataType_t and ncclRedOp_t (nccl.h; stable since NCCL 2.0 / bf16 since 2.10)
NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
               "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_SUM = 0


def _libnccl() -> ctypes.CDLL:
    """The NCCL library torch already loaded (same communicator ABI), found through /proc/self/maps."""
    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libnccl" in line:
                    path = line.split()[-1]
                    break
    except OSError:
        pass
    lib = ctypes.CDLL(path or "libnccl.so.2")
    u64, p, i = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
    lib.ncclAllReduce.argtypes = [p, p, u64, i, i, p, p]
    lib.ncclAllGather.argtypes = [p, p, u64, i, p, p]
    lib.ncclGetErrorString.restype = ctypes.c_char_p
    lib.ncclGetErrorString.argtypes = [i]
    return lib


def _comm_ptr(group=None) -> Optional[int]:
    pg = group or dist.distributed_c10d._get_default_group()
    try:
        backend = pg._get_backend(torch.device("cuda"))
        return int(backend._comm_ptr())
    except (AttributeError, RuntimeError):
        return None


class NcclSlotFiller:
    """Fill slots with direct NCCL calls on torch's communicator (groups "tp" and "world" span every rank)."""

    def __init__(self, comm: int):
        self.comm = ctypes.c_void_p(comm)
        self.lib = _libnccl()
        self.filled = 0

    def __call__(self, spec: schema.SlotSpec) -> None:
        if spec.dtype not in NCCL_DTYPES:
            raise FoundryError(f"slot {spec.id}: dtype {spec.dtype!r} has no NCCL type")
        dtype = NCCL_DTYPES[spec.dtype]
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        send, recv = ctypes.c_void_p(spec.send), ctypes.c_void_p(spec.recv)
        if spec.op == "all_reduce":
            rc = self.lib.ncclAllReduce(send, recv, spec.count, dtype, NCCL_SUM, self.comm, stream)
        elif spec.op == "all_gather":
            rc = self.lib.ncclAllGather(send, recv, spec.count, dtype, self.comm, stream)
        else:
            raise FoundryError(f"slot {spec.id}: collective {spec.op!r} is not supported")
        if rc != 0:
            raise FoundryError(f"slot {spec.id} ({spec.op}): NCCL error {rc}: "
                               f"{self.lib.ncclGetErrorString(rc).decode(errors='replace')}")
        self.filled += 1


class TorchSlotFiller:
    """Fill slots through torch.distributed under the capture (when the communicator pointer is unavailable)."""

    def __init__(self, device: int):
        self.device = device
        self.filled = 0

    def _tensor(self, address: int, nbytes: int, dtype: str):
        t = getattr(torch, dtype)
        n = nbytes // t.itemsize
        return tensor_at(schema.TensorSpec(address=address, dtype=dtype, shape=[n], strides=[1], storage_bytes=nbytes),
                         self.device)

    def __call__(self, spec: schema.SlotSpec) -> None:
        send = self._tensor(spec.send, spec.send_bytes, spec.dtype)
        if spec.op == "all_reduce":
            dist.all_reduce(send)
        elif spec.op == "all_gather":
            dist.all_gather_into_tensor(self._tensor(spec.recv, spec.recv_bytes, spec.dtype), send)
        else:
            raise FoundryError(f"slot {spec.id}: collective {spec.op!r} is not supported")
        self.filled += 1


def make_slot_filler(device: int):
    """The filler for this process: direct NCCL when torch exposes the communicator, else torch.distributed.
    ``FOUNDRY_SLOT_FILLER=torch|nccl`` forces one."""
    choice = os.environ.get("FOUNDRY_SLOT_FILLER", "auto")
    comm = _comm_ptr() if choice in ("auto", "nccl") else None
    if comm:
        return NcclSlotFiller(comm)
    if choice == "nccl":
        raise FoundryError("FOUNDRY_SLOT_FILLER=nccl but torch does not expose the NCCL communicator")
    return TorchSlotFiller(device)
