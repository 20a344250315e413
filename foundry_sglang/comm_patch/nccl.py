"""LOAD (and the SAVE process itself): fill each slot by capturing the real collective on a live communicator.

torch is imported where it is used: the SGLang launcher imports this module (through the plugin) and must answer a
bad flag before torch is loaded.

A slot names its communication group (``SlotSpec.group``); the engine adapter hands :class:`SlotFiller` one
communicator per group name, built from the communicators its engine already created:

* :class:`NcclCommunicator` issues ``ncclAllReduce`` / ``ncclAllGather`` / ``ncclReduceScatter`` on an NCCL
  communicator through the very library that created it (torch's ``ProcessGroupNCCL`` communicator and torch's
  libnccl: :func:`process_group_communicator`; SGLang's pynccl communicator and pynccl's library: the plugin);
* :class:`TorchCommunicator` calls torch.distributed on a process group, where no communicator pointer is exposed.

``foundry_core.slots.fill_slots`` runs the filler on a stream that is capturing into the restored graph, in slot
order, the same order on every rank, so the captured collectives match across ranks. Whatever NCCL adds to a graph
(kernels, the host nodes of proxy transports, the event nodes of graph mixing) exists only in these live pieces.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Mapping, Optional, Protocol

from foundry_core import schema
from foundry_core.errors import FoundryError
from foundry_core.outputs import tensor_at

__all__ = ["Communicator", "NcclCommunicator", "SlotFiller", "TorchCommunicator", "process_group_communicator",
           "torch_nccl_library"]

log = logging.getLogger("foundry_sglang.comm_patch")

#: ncclDataType_t and ncclRedOp_t (nccl.h; stable since NCCL 2.0, bf16 since 2.10, avg since 2.10).
NCCL_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
               "float32": 7, "float64": 8, "bfloat16": 9}
NCCL_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}


class Communicator(Protocol):
    """Collectives on device addresses, enqueued on ``stream`` (a ``cudaStream_t`` as int)."""

    def all_reduce(self, send: int, recv: int, count: int, dtype: str, op: str, stream: int) -> None: ...

    def all_gather(self, send: int, recv: int, count: int, dtype: str, stream: int) -> None: ...

    def reduce_scatter(self, send: int, recv: int, count: int, dtype: str, op: str, stream: int) -> None: ...


def torch_nccl_library() -> ctypes.CDLL:
    """The NCCL library torch loaded (its communicators' ABI), found through /proc/self/maps."""
    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libnccl" in line:
                    path = line.split()[-1]
                    break
    except OSError:
        pass
    return ctypes.CDLL(path or "libnccl.so.2")


class NcclCommunicator:
    """One NCCL communicator (``ncclComm_t`` as int), called through ``lib``, the library that created it.

    Function pointers are taken with ``lib[name]`` (private objects), so the argument types set here never change
    those another user of the same library (torch, SGLang's pynccl) set on its own."""

    def __init__(self, lib: ctypes.CDLL, comm: int):
        if not comm:
            raise FoundryError("no NCCL communicator (null ncclComm_t)")
        self.comm = ctypes.c_void_p(comm)
        p, size, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self._all_reduce = lib["ncclAllReduce"]
        self._all_reduce.argtypes, self._all_reduce.restype = [p, p, size, i, i, p, p], i
        self._all_gather = lib["ncclAllGather"]
        self._all_gather.argtypes, self._all_gather.restype = [p, p, size, i, p, p], i
        self._reduce_scatter = lib["ncclReduceScatter"]
        self._reduce_scatter.argtypes, self._reduce_scatter.restype = [p, p, size, i, i, p, p], i
        self._error = lib["ncclGetErrorString"]
        self._error.argtypes, self._error.restype = [i], ctypes.c_char_p

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise FoundryError(f"{what}: NCCL error {rc}: {self._error(rc).decode(errors='replace')}")

    def all_reduce(self, send, recv, count, dtype, op, stream) -> None:
        self._check(self._all_reduce(send, recv, count, _dtype(dtype), _op(op), self.comm, stream), "ncclAllReduce")

    def all_gather(self, send, recv, count, dtype, stream) -> None:
        self._check(self._all_gather(send, recv, count, _dtype(dtype), self.comm, stream), "ncclAllGather")

    def reduce_scatter(self, send, recv, count, dtype, op, stream) -> None:
        self._check(self._reduce_scatter(send, recv, count, _dtype(dtype), _op(op), self.comm, stream),
                    "ncclReduceScatter")


class TorchCommunicator:
    """torch.distributed collectives on ``group`` over tensors at the slot's addresses (no pointer needed)."""

    _OPS = {"sum": "SUM", "prod": "PRODUCT", "max": "MAX", "min": "MIN", "avg": "AVG"}

    def __init__(self, group, device: int):
        self.group = group
        self.device = device

    def _tensor(self, address: int, count: int, dtype: str):
        import torch

        nbytes = count * getattr(torch, dtype).itemsize
        return tensor_at(schema.TensorSpec(address=address, dtype=dtype, shape=[count], strides=[1],
                                           storage_bytes=nbytes), self.device)

    def _reduce_op(self, op: str):
        import torch.distributed as dist

        return getattr(dist.ReduceOp, self._OPS[op])

    def all_reduce(self, send, recv, count, dtype, op, stream) -> None:
        import torch.distributed as dist

        if send != recv:
            raise FoundryError("torch.distributed all-reduce slots must be in place")
        dist.all_reduce(self._tensor(send, count, dtype), op=self._reduce_op(op), group=self.group)

    def all_gather(self, send, recv, count, dtype, stream) -> None:
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        dist.all_gather_into_tensor(self._tensor(recv, count * world, dtype), self._tensor(send, count, dtype),
                                    group=self.group)

    def reduce_scatter(self, send, recv, count, dtype, op, stream) -> None:
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        dist.reduce_scatter_tensor(self._tensor(recv, count, dtype), self._tensor(send, count * world, dtype),
                                   op=self._reduce_op(op), group=self.group)


def process_group_communicator(group=None) -> Optional[NcclCommunicator]:
    """An :class:`NcclCommunicator` on the NCCL communicator torch.distributed created for ``group`` (default:
    the default group), or None when torch does not expose it (then use :class:`TorchCommunicator`)."""
    import torch
    import torch.distributed as dist

    pg = group or dist.distributed_c10d._get_default_group()
    try:
        comm = int(pg._get_backend(torch.device("cuda"))._comm_ptr())
    except (AttributeError, RuntimeError):
        return None
    return NcclCommunicator(torch_nccl_library(), comm) if comm else None


class SlotFiller:
    """``filler(spec)`` for ``foundry_core``: the slot's collective on its group's communicator, on torch's current
    stream (the one ``fill_slots`` is capturing)."""

    def __init__(self, communicators: Mapping[str, Communicator]):
        self.communicators = dict(communicators)
        self.filled = 0

    def __call__(self, spec: schema.SlotSpec) -> None:
        import torch

        comm = self.communicators.get(spec.group)
        if comm is None:
            known = ", ".join(sorted(self.communicators)) or "none"
            raise FoundryError(f"slot {spec.id} ({spec.op}): no communicator for group {spec.group!r} in this "
                               f"process (groups: {known})")
        stream = torch.cuda.current_stream().cuda_stream
        op = spec.extra.get("reduce", "sum")
        if spec.op == "all_reduce":
            comm.all_reduce(spec.send, spec.recv, spec.count, spec.dtype, op, stream)
        elif spec.op == "all_gather":
            comm.all_gather(spec.send, spec.recv, spec.count, spec.dtype, stream)
        elif spec.op == "reduce_scatter":
            comm.reduce_scatter(spec.send, spec.recv, spec.count, spec.dtype, op, stream)
        else:
            raise FoundryError(f"slot {spec.id}: collective {spec.op!r} is not supported")
        self.filled += 1


def _dtype(name: str) -> int:
    if name not in NCCL_DTYPES:
        raise FoundryError(f"dtype {name!r} has no NCCL type")
    return NCCL_DTYPES[name]


def _op(name: str) -> int:
    if name not in NCCL_OPS:
        raise FoundryError(f"reduction {name!r} has no NCCL operation")
    return NCCL_OPS[name]
