"""What must match between the machine that saved an archive and the one that loads it.

Kernel images are machine code for one GPU architecture, arguments and launch attributes follow one driver's
ABI, and the graphs were captured from one software stack and one caller configuration (``key``). LOAD refuses
an archive whose :class:`~foundry_core.schema.Fingerprint` differs from this machine's in any field.

:func:`current_fingerprint` needs a CUDA GPU; :func:`check_compatible` is a pure function.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Iterable

from foundry_core.errors import DeviceUnavailable, FoundryError, IncompatibleArchive
from foundry_core.schema import Fingerprint

#: Fields in the order they are reported.
FIELDS = tuple(Fingerprint.__struct_fields__)
_SHOW = 40  # characters of a long value shown around the first difference


def gpu_unavailable_reason(device: int = 0) -> str | None:
    """None when CUDA device ``device`` can be queried through the driver API, else why not (one line)."""
    try:
        _query_device(device)
    except _NoGpu as err:
        return str(err)
    return None


def current_fingerprint(key: str, device: int = 0) -> Fingerprint:
    """This machine's fingerprint for CUDA device ``device`` (raises DeviceUnavailable without a usable GPU)."""
    try:
        gpu_name, capability, driver = _query_device(device)
    except _NoGpu as err:
        raise DeviceUnavailable(f"no usable CUDA device: {err}") from None
    import torch

    import foundry_core

    return Fingerprint(
        gpu_name=gpu_name,
        compute_capability=capability,
        driver_version=driver,
        cuda_runtime=torch.version.cuda or "",
        torch=str(torch.__version__),
        triton=_triton_version(),
        foundry=foundry_core.__version__,
        key=key,
    )


def check_compatible(
    saved: Fingerprint, current: Fingerprint, path: str | os.PathLike, ignore: Iterable[str] = ()
) -> None:
    """Raise IncompatibleArchive naming every field (except ``ignore``) where ``saved`` and ``current`` differ."""
    skipped = set(ignore)
    unknown = skipped - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown fingerprint fields to ignore: {sorted(unknown)}")
    differing = [f for f in FIELDS if f not in skipped and getattr(saved, f) != getattr(current, f)]
    if not differing:
        return
    was, now = [], []
    for field in differing:
        old, new = getattr(saved, field), getattr(current, field)
        if isinstance(old, str) and isinstance(new, str):
            old, new = _around_first_difference(old, new)
            was.append(f"{field}={old}")
            now.append(f"{field}={new}")
        else:
            was.append(f"{field}={old!r}")
            now.append(f"{field}={new!r}")
    raise IncompatibleArchive(f"archive {path} was saved for {' '.join(was)}; this machine has {' '.join(now)}")


def describe_machine(device: int = 0) -> str:
    """Multi-line description of this machine's fingerprint fields, or one line saying why there is none."""
    reason = gpu_unavailable_reason(device)
    if reason is not None:
        return f"no CUDA GPU usable here: {reason}"
    fingerprint = current_fingerprint(key="", device=device)
    return "\n".join(f"{field:<20}{getattr(fingerprint, field)}" for field in FIELDS if field != "key")


# -- internals ---------------------------------------------------------------------------------------------


class _NoGpu(Exception):
    pass


def _query_device(device: int) -> tuple[str, str, int]:
    """(name, "major.minor", driver version) through the CUDA driver API, or _NoGpu with a one-line reason."""
    from foundry_core.native import call, driver

    try:
        cu = driver()
        version = call("cuDriverGetVersion (is the NVIDIA driver installed?)", cu.cuDriverGetVersion)
        call("cuInit", cu.cuInit, 0)
        count = call("cuDeviceGetCount", cu.cuDeviceGetCount)
        if not 0 <= device < count:
            raise _NoGpu(f"CUDA device {device} requested but {count} visible")
        handle = call("cuDeviceGet", cu.cuDeviceGet, device)
        name = call("cuDeviceGetName", cu.cuDeviceGetName, 256, handle)
        attr = cu.CUdevice_attribute
        major = call("cuDeviceGetAttribute", cu.cuDeviceGetAttribute,
                     attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle)
        minor = call("cuDeviceGetAttribute", cu.cuDeviceGetAttribute,
                     attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle)
    except FoundryError as err:  # no cuda-bindings, no driver library, a failing call
        raise _NoGpu(str(err)) from None
    name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return name, f"{major}.{minor}", int(version)


def _triton_version() -> str:
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _around_first_difference(a: str, b: str) -> tuple[str, str]:
    """Both strings as reprs, cut to a window around their first difference when they are long."""
    if len(a) <= _SHOW and len(b) <= _SHOW:
        return repr(a), repr(b)
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, first - _SHOW // 4)

    def cut(s: str) -> str:
        piece = s[start : start + _SHOW]
        return ("…" if start else "") + repr(piece) + ("…" if start + _SHOW < len(s) else "")

    return cut(a), cut(b)
