"""Module-scope variables (``__device__`` / ``__constant__``) that graphs depend on: found at SAVE.

A kernel image loaded fresh at LOAD holds its variables at new addresses, with the values the ELF gives them
(``cubin.GlobalVar.initial``). Two ways a captured graph can depend on more than that, neither visible to the
arena, the allocation trace or the pointer check (module memory is the driver's, not an allocation):

* **address references**: a library asks the driver for a variable's address (``cudaGetSymbolAddress`` ->
  ``cuModuleGetGlobal_v2`` / ``cuLibraryGetGlobal``) and passes it to kernels as an argument. cuBLAS 13 does
  this: ``cublas::internal::deviceConstants`` (112 bytes of 1.0/0.0 scalars) lives in a module with no
  kernels, so kernels can only reach it through an argument (e.g. the ``_ref`` GEMV/GEMM variants that take
  ``const float* alpha, beta``). Such an image is not archived (no graph kernel comes from it) and the address
  is meaningless in a fresh process: the restored kernel reads whatever lies there — silent garbage, or a fault.
* **changed values**: a library writes a variable after loading (``cudaMemcpyToSymbol``), or a kernel leaves
  state in one (a counter it does not reset); the fresh load at LOAD has the ELF's initial value instead.

The recorder (``recorder.ImageRecorder.globals``) keeps every (name, address, size) the driver handed out;
:func:`argument_refs` finds argument words inside those ranges; :func:`changed_values` compares the live bytes of
the variables of the modules graph kernels come from with their initial bytes.

What SAVE does with the findings is ``Options.module_globals`` (``FOUNDRY_MODULE_GLOBALS``): ``warn`` (default: one log
line per finding, counted in ``Session.save_stats``), ``refuse`` (UnsafeAddress / UnsupportedGraph naming the
variable), ``off``, or ``relocate`` (EXPERIMENTAL, not yet run on a GPU): SAVE archives the image each variable
comes from (a kernel-less one included) and records the variable's live bytes and the argument words that point
into it (``schema.ModuleVariable``); LOAD looks the variable up in its fresh load of that image
(:func:`apply_variables`), writes the bytes there and patches the words before any graph is built. Validated by
the ``relocate`` variant of ``tests/gpu/test_fidelity_gemm.py``.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from foundry_core.errors import FoundryError, UnsupportedGraph
from foundry_core.native import call, driver

__all__ = ["GlobalRef", "ChangedGlobal", "apply_variables", "argument_refs", "changed_values"]

log = logging.getLogger("foundry_core.modglobals")


@dataclass(frozen=True)
class GlobalRef:
    """An argument word of a graph node that points into a module variable."""

    graph: str
    node: int
    offset: int  # byte offset of the word in the node's arguments
    address: int
    name: str  # the variable
    var_address: int
    var_size: int

    def describe(self, node_name: str = "") -> str:
        what = f"node {self.node}" + (f" ({node_name})" if node_name else "")
        return (f"graph {self.graph!r}: {what} takes address {self.address:#x} = {self.name} + "
                f"{self.address - self.var_address} (argument byte {self.offset}), a {self.var_size}-byte module "
                "variable whose address a library asked the driver for; a fresh load of its image at LOAD puts it "
                "elsewhere")


@dataclass(frozen=True)
class ChangedGlobal:
    """A variable of a module graph kernels come from whose live bytes differ from the image's initial bytes."""

    name: str
    section: str
    image_sha256: str
    address: int
    initial: bytes
    live: bytes

    def describe(self) -> str:
        first = next((i for i, (a, b) in enumerate(zip(self.initial, self.live)) if a != b), 0)
        return (f"module variable {self.name} ({self.section}, {len(self.live)} bytes) of image "
                f"{self.image_sha256[:12]} was changed after its module was loaded (first difference at byte "
                f"{first}: {self.initial[first:first + 8].hex()} in the image, {self.live[first:first + 8].hex()} "
                "live); LOAD would load the image's initial value")


def _ranges(globals_: Iterable) -> tuple[np.ndarray, np.ndarray, list]:
    """Sorted (start, end) arrays and the matching records of the non-empty recorded variables."""
    recs = sorted((g for g in globals_ if g.size > 0), key=lambda g: g.address)
    starts = np.array([g.address for g in recs], dtype=np.uint64)
    ends = np.array([g.address + g.size for g in recs], dtype=np.uint64)
    return starts, ends, recs


def argument_refs(graph: str, payload: bytes, spans: Iterable[tuple[int, int, int]], globals_: Sequence
                  ) -> list[GlobalRef]:
    """Every 8-byte-aligned word of the spans (node, payload offset, length) that lies inside a recorded module
    variable (``globals_``: objects with name, address, size, e.g. ``recorder.ModuleGlobal``)."""
    starts, ends, recs = _ranges(globals_)
    spans = [(node, off, length // 8) for node, off, length in spans if length >= 8]
    if not len(recs) or not spans:
        return []
    words = np.concatenate([np.frombuffer(payload, "<u8", count=n, offset=off) for _, off, n in spans])
    i = np.searchsorted(starts, words, side="right") - 1
    hit = np.zeros(len(words), bool)
    ok = i >= 0
    hit[ok] = words[ok] < ends[i[ok]]
    if not hit.any():
        return []
    nodes = np.repeat([node for node, _, _ in spans], [n for _, _, n in spans])
    first = np.repeat(np.cumsum([0] + [n for _, _, n in spans[:-1]]), [n for _, _, n in spans])
    out = []
    for k in np.nonzero(hit)[0].tolist():
        g = recs[int(i[k])]
        out.append(GlobalRef(graph, int(nodes[k]), 8 * (k - int(first[k])), int(words[k]), g.name, g.address,
                             g.size))
    return out


def inside_any(address: int, globals_: Sequence) -> bool:
    """Whether ``address`` lies inside one of the recorded variables."""
    return any(g.address <= address < g.address + g.size for g in globals_)


def image_of_variable(var, images: Sequence, module_images: Mapping[int, int], parse: Callable
                      ) -> tuple[str, bytes]:
    """(sha256, bytes) of the recorded image (``images``: objects with sha256 and data) a recorded variable
    (``recorder.ModuleGlobal``) belongs to: the image its module's load returned (``module_images``: CUmodule ->
    image index), else the one image whose ELF for this GPU (``parse(bytes)`` -> cubin.ImageInfo) defines a
    variable of that name and size. UnsupportedGraph when there is none or several."""
    def defines(data: bytes) -> bool:
        v = parse(data).globals.get(var.name)
        return v is not None and v.size == var.size

    if not var.via_library and var.handle in module_images:
        im = images[module_images[var.handle]]
        if defines(im.data):
            return im.sha256, im.data
    found = {im.sha256: im.data for im in images if defines(im.data)}
    if len(found) != 1:
        raise UnsupportedGraph(
            f"module variable {var.name[:80]} ({var.size} bytes), which graph arguments point into, is defined in "
            f"{len(found)} recorded images; cannot tell which one to load at LOAD")
    return next(iter(found.items()))


def changed_values(modules: Mapping[int, tuple[str, Mapping]], address_of: Callable[[int, str], Optional[tuple]],
                   read: Callable[[int, int], bytes]) -> list[ChangedGlobal]:
    """Variables whose live bytes differ from their image's initial bytes.

    ``modules``: live module handle -> (image sha256, {name: cubin.GlobalVar}) for the modules graph kernels come
    from; ``address_of(module, name)`` -> (address, size) or None (cuModuleGetGlobal); ``read(address, size)``
    -> the live bytes."""
    out = []
    for handle, (sha, variables) in modules.items():
        for name, var in variables.items():
            where = address_of(handle, name)
            if where is None:
                continue
            address, size = where
            if size != var.size or not size:
                continue
            live = read(address, size)
            if not var.same_as_loaded(live):
                out.append(ChangedGlobal(name, var.section, sha, address, var.initial, live))
    return out


def apply_variables(variables: Sequence, arrays: dict[int, tuple], modules: Sequence[int],
                    address_of: Callable[[int, str], Optional[tuple]], write: Callable[[int, bytes], None],
                    value_of: Callable[[str], bytes]) -> dict[int, tuple]:
    """LOAD side of ``relocate``: for each ``schema.ModuleVariable``, find it in its freshly loaded module
    (``address_of(modules[image], name)``), write SAVE's bytes there (``write(address, value_of(blob))``) and
    point every recorded argument word at it. ``arrays``: graph index -> (nodes, payload, attrs, edges); returns
    it with the patched payloads (copies; the archive's arrays are left alone)."""
    out = dict(arrays)
    for var in variables:
        where = address_of(int(modules[var.image]), var.name)
        if where is None or where[1] != var.size:
            got = "not found" if where is None else f"{where[1]} bytes"
            raise FoundryError(f"module variable {var.name[:80]} ({var.size} bytes) of archived image #{var.image}: "
                               f"{got} in the freshly loaded module; cannot relocate the graphs' references to it")
        address = where[0]
        if var.value:
            data = value_of(var.value)
            if len(data) != var.size:
                raise FoundryError(f"module variable {var.name[:80]}: {len(data)} value bytes for {var.size}")
            write(address, data)
        for graph, offset, inside in var.refs:
            nodes, payload, attrs, edges = out[graph]
            if payload is arrays[graph][1]:
                payload = np.array(payload, dtype=np.uint8, copy=True)
            payload[offset:offset + 8] = np.frombuffer((address + inside).to_bytes(8, "little"), np.uint8)
            out[graph] = (nodes, payload, attrs, edges)
    return out


# -- driver-side helpers (SAVE) ----------------------------------------------------------------------------------
def driver_address_of(module: int, name: str) -> Optional[tuple[int, int]]:
    """(address, size) of a module's variable (cuModuleGetGlobal), None when the driver does not know it."""
    drv = driver()
    err, address, size = drv.cuModuleGetGlobal(drv.CUmodule(module), name.encode("utf-8", errors="surrogateescape"))
    if int(err) != 0:
        return None
    return int(address), int(size)


def driver_write(address: int, data: bytes) -> None:
    """Host bytes to device ``address`` (cuMemcpyHtoD, synchronous)."""
    drv = driver()
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    call("cuMemcpyHtoD (module variable)", drv.cuMemcpyHtoD, address, ctypes.addressof(buf), len(data))


def driver_read(address: int, size: int) -> bytes:
    """Device bytes at ``address`` (cuMemcpyDtoH, synchronous)."""
    drv = driver()
    buf = ctypes.create_string_buffer(size)
    call("cuMemcpyDtoH (module variable)", drv.cuMemcpyDtoH, ctypes.addressof(buf), address, size)
    return buf.raw
