"""What must match between the machine that saved an archive and the one that loads it.

Kernel images are machine code for one GPU architecture, arguments and launch attributes follow one driver's
ABI, and the graphs were captured from one software stack and one caller configuration (``key``). LOAD refuses
an archive whose :class:`~foundry_core.schema.Fingerprint` differs from this machine's in any field.

:func:`current_fingerprint` needs a CUDA GPU; :func:`check_compatible` is a pure function.
:func:`installed_torch_versions` reads torch's version without importing torch (an early LOAD runs while the
application is still importing it).
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

import foundry_core
from foundry_core import native
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


def current_fingerprint(key: str, device: int = 0, torch_versions: Optional[tuple[str, str]] = None) -> Fingerprint:
    """This machine's fingerprint for CUDA device ``device`` (raises DeviceUnavailable without a usable GPU).

    ``torch_versions``: (torch version, its CUDA runtime) as :func:`installed_torch_versions` gives them; None
    imports torch and asks it."""
    try:
        gpu_name, capability, driver = _query_device(device)
    except _NoGpu as err:
        raise DeviceUnavailable(f"no usable CUDA device: {err}") from None
    if torch_versions is None:
        import torch

        torch_versions = (str(torch.__version__), torch.version.cuda or "")
    return Fingerprint(
        gpu_name=gpu_name,
        compute_capability=capability,
        driver_version=driver,
        cuda_runtime=torch_versions[1],
        torch=torch_versions[0],
        triton=_triton_version(),
        foundry=foundry_core.__version__,
        key=key,
    )


def installed_torch_versions() -> Optional[tuple[str, str]]:
    """(``str(torch.__version__)``, ``torch.version.cuda or ""``) without importing torch: torch reads both from
    its generated ``torch/version.py``, which this parses. None when that file is not there or not as expected.
    (The package metadata is no substitute: its version lacks the local part, e.g. ``+cu130``.)"""
    module = sys.modules.get("torch")
    version = getattr(module, "version", None)
    if getattr(version, "__version__", None) is not None:  # torch is imported: ask it
        return str(version.__version__), version.cuda or ""
    try:
        spec = importlib.util.find_spec("torch")
        source = Path(list(spec.submodule_search_locations)[0], "version.py").read_text()
        values = {}
        for node in ast.parse(source).body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(
                node, "target", None)
            if isinstance(target, ast.Name) and target.id in ("__version__", "cuda") and node.value is not None:
                values[target.id] = ast.literal_eval(node.value)
        if not isinstance(values.get("__version__"), str) or not isinstance(values.get("cuda", ""), (str, type(None))):
            return None
        return values["__version__"], values.get("cuda") or ""
    except (ImportError, ValueError, TypeError, AttributeError, IndexError, OSError, SyntaxError):
        return None


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
    call = native.call
    try:
        cu = native.driver()
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
