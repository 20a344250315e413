"""Kernel images: tie the kernels of captured graphs to recorded module images (SAVE), load them back (LOAD).

SAVE
    ``refs = resolve_functions(kernel_node_functions, recorder)`` maps every ``CUfunction`` of the graphs to
    the image it came from, by identity (see :func:`resolve_functions`; the images come from
    :class:`foundry_core.recorder.ImageRecorder`). ``stored, functions = select_images(recorder.images(), refs)``
    gives the images to write and the :class:`~foundry_core.schema.KernelFunction` records.

LOAD
    ``modules = load_images(images)``; ``funcs = get_functions(modules, functions)`` (re-applies the
    function attributes the workload had set, such as the maximum dynamic shared memory). ``load_kernels`` does
    both, in one native call when the helper library is at hand.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from foundry_core import cubin
from foundry_core.errors import DriverError, FoundryError, UnsupportedGraph
from foundry_core.native import call as _call
from foundry_core.native import driver as _drv
from foundry_core.recorder import CapturedImage, ImageRecorder
from foundry_core.schema import KernelFunction, KernelImage

__all__ = [
    "DriverError", "FunctionRef", "ImageFacts", "ModuleFacts", "StoredImage", "changed_attributes", "choose_image",
    "consistent_with_cubin", "device_arch", "get_functions", "image_facts", "load_images", "load_kernels",
    "loading_mode", "resolve_functions", "select_images", "unload_modules",
]

log = logging.getLogger("foundry_core.images")

# CUfunction_attribute values (stable in the driver API since CUDA 12).
ATTR_MAX_THREADS_PER_BLOCK = 0
ATTR_SHARED_SIZE_BYTES = 1
ATTR_CONST_SIZE_BYTES = 2
ATTR_LOCAL_SIZE_BYTES = 3
ATTR_NUM_REGS = 4
ATTR_PTX_VERSION = 5
ATTR_BINARY_VERSION = 6
ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT = 9
ATTR_REQUIRED_CLUSTER_WIDTH = 11
ATTR_REQUIRED_CLUSTER_HEIGHT = 12
ATTR_REQUIRED_CLUSTER_DEPTH = 13
ATTR_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE = 15

#: Read-only facts that identify a compiled function; compared between the live function and a fresh load.
IDENTITY_ATTRIBUTES = (
    ATTR_NUM_REGS,
    ATTR_SHARED_SIZE_BYTES,
    ATTR_CONST_SIZE_BYTES,
    ATTR_LOCAL_SIZE_BYTES,
    ATTR_MAX_THREADS_PER_BLOCK,
    ATTR_BINARY_VERSION,
    ATTR_PTX_VERSION,
)

#: Attributes cuFuncSetAttribute accepts, in the order LOAD applies them (permission before size).
SETTABLE_ATTRIBUTES = (
    ATTR_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
    ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES,
    ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT,
    ATTR_REQUIRED_CLUSTER_WIDTH,
    ATTR_REQUIRED_CLUSTER_HEIGHT,
    ATTR_REQUIRED_CLUSTER_DEPTH,
    ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE,
)

#: sm_90+ reserve 1 KiB of shared memory per block; some toolchains count it in .nv.shared.<name>, the
#: driver may or may not report it in SHARED_SIZE_BYTES.
RESERVED_SHARED_BYTES = 1024


# ---------------------------------------------------------------------------
# Matching live modules to images (pure logic, no CUDA)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    """What matching needs to know about one distinct image."""

    index: int  # position in the caller's image list (first of identical copies)
    sha256: str
    #: entry names of the ELF the device would load; None when unknown (compressed with an unavailable
    #: codec, unparseable): then only a probe load can tell
    names: frozenset[str] | None
    kernels: Mapping[str, cubin.KernelInfo] = field(default_factory=dict)
    problem: str = ""  # why the names are unknown
    driver_checked: bool = False  # names (or the failure) come from loading the image with the driver

    @property
    def probeable(self) -> bool:
        """Unknown names may still be learnt by loading the image (e.g. zstd-compressed without a decoder);
        bytes that are no CUDA image at all are not worth a driver call."""
        return self.names is None and not self.driver_checked and not self.problem.startswith("not a CUDA module")


@dataclass(frozen=True)
class ModuleFacts:
    """What the driver says about one live CUmodule."""

    names: frozenset[str]  # every function in the module (cuModuleEnumerateFunctions)
    #: identity attributes of the functions graphs use: name -> {CUfunction_attribute: value}
    used: Mapping[str, Mapping[int, int]]
    #: index of the image the recorder saw this module's load call return, if any
    known_image: int | None = None


#: probe(image_index) -> (all function names of a fresh load, {used name: identity attributes})
Probe = Callable[[int], "tuple[frozenset[str], dict[str, dict[int, int]]]"]


def image_facts(images: Sequence[bytes], arch: int) -> list[ImageFacts]:
    """Distinct images (by sha256) with the kernel names an ``sm_<arch>`` device would see."""
    out: list[ImageFacts] = []
    seen: set[str] = set()
    for i, data in enumerate(images):
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            continue
        seen.add(sha)
        try:
            info = cubin.parse_image(data)
        except ValueError as err:
            out.append(ImageFacts(i, sha, None, problem=str(err)))
            continue
        chosen = info.for_arch(arch)
        if chosen is None:
            problem = "; ".join(info.notes) or f"no sm_{arch} code in this {info.kind} (sm_{info.arch})"
            out.append(ImageFacts(i, sha, None, problem=problem))
        else:
            out.append(ImageFacts(i, sha, chosen.kernel_names, dict(chosen.kernels)))
    return out


def consistent_with_cubin(kernel: cubin.KernelInfo, attrs: Mapping[int, int]) -> bool:
    """Whether driver-reported attributes of a function can belong to this parsed kernel.

    Compares only facts with one clear meaning: register count, static shared memory (allowing for the
    1 KiB system reservation), and launch bounds.
    """
    regs = attrs.get(ATTR_NUM_REGS)
    if kernel.registers >= 0 and regs is not None and regs != kernel.registers:
        return False
    shared = attrs.get(ATTR_SHARED_SIZE_BYTES)
    if (kernel.shared_bytes >= 0 and shared is not None
            and abs(shared - kernel.shared_bytes) not in (0, RESERVED_SHARED_BYTES)):
        return False
    max_threads = attrs.get(ATTR_MAX_THREADS_PER_BLOCK)
    for bound in (kernel.max_threads, kernel.req_threads):
        if bound is not None and max_threads is not None and max_threads > bound[0] * bound[1] * bound[2]:
            return False
    return True


def _describe(facts: Sequence[ImageFacts], indexes: Iterable[int]) -> str:
    by_index = {f.index: f for f in facts}
    return ", ".join(f"#{i} ({by_index[i].sha256[:12]})" for i in indexes)


def choose_image(module: ModuleFacts, facts: Sequence[ImageFacts], probe: Probe | None = None) -> tuple[int, str]:
    """The index of the image a live module was loaded from, and how it was decided.

    1. the image the module's own load call returned (``known_image``), if its names agree;
    2. else images whose entry-name set equals the module's function-name set (identical bytes count once);
    3. several left: keep those whose parsed ELF facts fit every used function's attributes;
    4. then, with ``probe``, load each remaining candidate and keep those whose fresh functions have the same
       identity attributes as the live ones (this also verifies a unique winner).
    Raises UnsupportedGraph naming the kernels and the candidates when not exactly one image remains.
    """
    used = sorted(module.used)
    label = ", ".join(used[:3]) + (f" (+{len(used) - 3} more)" if len(used) > 3 else "")
    probed: dict[int, tuple[frozenset[str], dict[str, dict[int, int]]]] = {}

    def probe_once(index: int):
        if index not in probed:
            probed[index] = probe(index)
        return probed[index]

    if not module.names:
        raise UnsupportedGraph(f"kernel {label}: the driver lists no functions in its module")
    by_index = {f.index: f for f in facts}
    if module.known_image is not None:
        known = by_index.get(module.known_image)
        if known is not None and (known.names is None or known.names == module.names):
            if probe is None or _same_identity(module, probe_once(known.index)):
                return known.index, "handle"
        log.warning("module of %s: the recorded load does not match its functions; matching by names", label)

    candidates = [f.index for f in facts if f.names is not None and f.names == module.names]
    named = list(candidates)
    how = "names"
    if len(candidates) > 1:
        narrowed = [i for i in candidates
                    if all(name in by_index[i].kernels and consistent_with_cubin(by_index[i].kernels[name], attrs)
                           for name, attrs in module.used.items()) or not by_index[i].kernels]
        if narrowed and len(narrowed) < len(candidates):
            how += "+cubin"
        candidates = narrowed or candidates
    if probe is not None and candidates:
        verified = [i for i in candidates if _same_identity(module, probe_once(i))]
        if len(verified) < len(candidates) and len(candidates) > 1 and verified:
            how += "+probe"
        candidates = verified
    if len(candidates) == 1:
        return candidates[0], how
    if named and not candidates:
        raise UnsupportedGraph(
            f"kernel {label}: {len(named)} recorded images have its module's function names "
            f"({_describe(facts, named)}) but none loads with the same registers/shared/local/constant sizes")
    if not candidates:
        unknown = [f for f in facts if f.names is None]
        hint = f"; {len(unknown)} recorded images could not be read ({unknown[0].problem})" if unknown else ""
        raise UnsupportedGraph(
            f"kernel {label}: no recorded module image has exactly this module's {len(module.names)} functions "
            f"(was the image recorder started before CUDA was initialised?){hint}")
    raise UnsupportedGraph(
        f"kernel {label}: {len(candidates)} different recorded images fit its module equally well "
        f"({_describe(facts, candidates)}); cannot tell which one it was loaded from")


def _same_identity(module: ModuleFacts, fresh: tuple[frozenset[str], dict[str, dict[int, int]]]) -> bool:
    names, attrs = fresh
    if names != module.names:
        return False
    for name, live in module.used.items():
        got = attrs.get(name)
        if got is None:
            return False
        for key in IDENTITY_ATTRIBUTES:
            if key in live and key in got and live[key] != got[key]:
                return False
    return True


def changed_attributes(current: Mapping[int, int], defaults: Mapping[int, int]) -> dict[int, int]:
    """Settable attributes whose current value differs from a freshly loaded function's."""
    return {a: current[a] for a in SETTABLE_ATTRIBUTES if a in current and current[a] != defaults.get(a)}


# ---------------------------------------------------------------------------
# Driver queries (cuda.bindings through foundry_core.native)
# ---------------------------------------------------------------------------


def _func_attrs(drv, func, keys: Iterable[int]) -> dict[int, int]:
    """{attribute: value} for the given CUfunction_attribute ids; ids this driver does not know are left out."""
    out = {}
    for key in keys:
        try:
            attr = drv.CUfunction_attribute(key)
        except ValueError:
            continue
        try:
            out[key] = int(_call("cuFuncGetAttribute", drv.cuFuncGetAttribute, attr, func))
        except DriverError as err:
            if err.status == "CUDA_ERROR_FUNCTION_NOT_LOADED" and hasattr(drv, "cuFuncLoad"):
                # Lazy module loading: a function fresh from cuModuleLoadData has no attributes until loaded.
                _call("cuFuncLoad", drv.cuFuncLoad, func)
                out[key] = int(_call("cuFuncGetAttribute", drv.cuFuncGetAttribute, attr, func))
            elif err.status not in ("CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_SUPPORTED"):
                raise
    return out


def _module_functions(drv, mod) -> dict[str, object]:
    count = _call("cuModuleGetFunctionCount", drv.cuModuleGetFunctionCount, mod)
    funcs = _call("cuModuleEnumerateFunctions", drv.cuModuleEnumerateFunctions, count, mod) if count else []
    return {cubin.decode_name(_call("cuFuncGetName", drv.cuFuncGetName, f)): f for f in funcs}


def device_arch() -> int:
    """SM number (e.g. 90) of the current context's device."""
    drv = _drv()
    dev = _call("cuCtxGetDevice (is a CUDA context current?)", drv.cuCtxGetDevice)
    attr = drv.CUdevice_attribute
    wanted = (attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
    major, minor = (_call("cuDeviceGetAttribute", drv.cuDeviceGetAttribute, a, dev) for a in wanted)
    return int(major) * 10 + int(minor)


@dataclass(frozen=True)
class FunctionRef:
    """A live CUfunction tied to the image it was loaded from."""

    handle: int  # the CUfunction
    name: str
    image: int  # index into the image list given to resolve_functions (first of identical copies)
    sha256: str  # of that image
    #: settable attributes (CUfunction_attribute -> value) that differ from a freshly loaded function
    attributes: dict[int, int]
    how: str  # how the image was identified: "handle", "names", "names+cubin", "names+probe", ...


def _image_bytes(images: Sequence[CapturedImage | bytes]) -> list[bytes]:
    return [im.data if isinstance(im, CapturedImage) else bytes(im) for im in images]


def resolve_functions(
    funcs: Sequence[int],
    images: "Sequence[CapturedImage | bytes] | ImageRecorder",
    known_modules: Mapping[int, int] | None = None,
) -> list[FunctionRef]:
    """Map each CUfunction (of graph kernel nodes) to the recorded image it came from, by identity.

    ``images`` is the recorder (its images and CUmodule pairings are used) or a list of images;
    ``known_modules`` maps CUmodule handles to indexes in that list (``ImageRecorder.module_images()``).
    Every used image is loaded once into the current context to verify the match and to read the default
    attributes of its functions, so LOAD re-applies only what the workload changed. Requires the context the
    functions live in to be current. Returns one FunctionRef per input, in order.
    """
    if isinstance(images, ImageRecorder):
        known_modules = images.module_images() if known_modules is None else known_modules
        images = images.images()
    data = _image_bytes(images)
    known_modules = known_modules or {}
    drv = _drv()
    t0 = time.perf_counter()
    arch = device_arch()
    facts = image_facts(data, arch)
    sha_by_index = {f.index: f.sha256 for f in facts}
    first_of_sha = {f.sha256: f.index for f in facts}

    probes: dict[tuple[int, frozenset[str]], tuple] = {}

    def probe_full(index: int, wanted: frozenset[str]):
        """Load image ``index`` fresh: all its function names, and the identity and default settable
        attributes of the ``wanted`` functions."""
        key = (index, wanted)
        if key not in probes:
            mod = _call(f"cuModuleLoadData(recorded image #{index})", drv.cuModuleLoadData, data[index])
            try:
                fresh = _module_functions(drv, mod)
                ident = {n: _func_attrs(drv, f, IDENTITY_ATTRIBUTES) for n, f in fresh.items() if n in wanted}
                dflt = {n: _func_attrs(drv, f, SETTABLE_ATTRIBUTES) for n, f in fresh.items() if n in wanted}
            finally:
                _call("cuModuleUnload", drv.cuModuleUnload, mod)
            probes[key] = (frozenset(fresh), ident, dflt)
        return probes[key]

    # Group the distinct functions by module.
    unique = list(dict.fromkeys(int(f) for f in funcs))
    by_module: dict[int, list[int]] = {}
    for f in unique:
        mod = _call("cuFuncGetModule", drv.cuFuncGetModule, drv.CUfunction(f))
        by_module.setdefault(int(mod), []).append(f)

    resolved: dict[int, FunctionRef] = {}
    for mod_handle, members in by_module.items():
        names = _module_functions(drv, drv.CUmodule(mod_handle))
        member_names = {f: cubin.decode_name(_call("cuFuncGetName", drv.cuFuncGetName, drv.CUfunction(f)))
                        for f in members}
        wanted = frozenset(member_names.values())
        used = {n: _func_attrs(drv, drv.CUfunction(f), IDENTITY_ATTRIBUTES) for f, n in member_names.items()}
        known = known_modules.get(mod_handle)
        if known is not None and 0 <= known < len(data):
            known = first_of_sha.get(sha_by_index.get(known) or hashlib.sha256(data[known]).hexdigest(), known)
        module = ModuleFacts(frozenset(names), used, known)
        try:
            index, how = choose_image(module, facts, lambda i: probe_full(i, wanted)[:2])
        except UnsupportedGraph:
            if not any(f.probeable for f in facts):
                raise
            # Some images could not be read here (e.g. zstd-compressed): learn their names from the driver once.
            facts = [_learn_names(f, lambda i: probe_full(i, frozenset())[0]) if f.probeable else f for f in facts]
            index, how = choose_image(module, facts, lambda i: probe_full(i, wanted)[:2])
        defaults = probe_full(index, wanted)[2]
        for f, n in member_names.items():
            current = _func_attrs(drv, drv.CUfunction(f), SETTABLE_ATTRIBUTES)
            changed = changed_attributes(current, defaults.get(n, {}))
            resolved[f] = FunctionRef(f, n, index, sha_by_index[index], changed, how)
    log.info("resolved %d functions in %d modules to %d images in %.3f s", len(unique), len(by_module),
             len({r.image for r in resolved.values()}), time.perf_counter() - t0)
    return [resolved[int(f)] for f in funcs]


def _learn_names(f: ImageFacts, names_of: Callable[[int], frozenset[str]]) -> ImageFacts:
    try:
        return ImageFacts(f.index, f.sha256, names_of(f.index), problem=f.problem, driver_checked=True)
    except FoundryError as err:
        return ImageFacts(f.index, f.sha256, None, problem=f"{f.problem}; the driver does not load it: {err}",
                          driver_checked=True)


@dataclass(frozen=True)
class StoredImage:
    """An image to write into the archive."""

    data: bytes
    sha256: str
    kernels: list[str]

    def record(self, blob: str) -> KernelImage:
        return KernelImage(sha256=self.sha256, blob=blob, size=len(self.data), kernels=self.kernels)


def select_images(
    images: Sequence[CapturedImage | bytes], refs: Sequence[FunctionRef]
) -> tuple[list[StoredImage], list[KernelFunction]]:
    """The images the functions need (each once) and one KernelFunction per distinct (image, name).

    ``KernelFunction.image`` indexes the returned image list; ``{(stored[f.image].sha256, f.name): i}`` maps a
    FunctionRef (its ``sha256``, ``name``) to its KernelFunction. Two live functions of identical images and
    names (modules loaded twice from the same bytes) share one record: their maximum dynamic shared memory is
    merged to the larger value; any other differing attribute raises UnsupportedGraph.
    """
    data = _image_bytes(images)
    stored: list[StoredImage] = []
    where: dict[str, int] = {}
    attrs_of: dict[tuple[str, str], dict[int, int]] = {}
    for ref in refs:
        if ref.sha256 not in where:
            blob = data[ref.image] if 0 <= ref.image < len(data) else b""
            if hashlib.sha256(blob).hexdigest() != ref.sha256:
                raise FoundryError(f"kernel {ref.name}: image #{ref.image} is not the one it was resolved to "
                                   "(pass select_images the image list resolve_functions used)")
            try:
                names = sorted(cubin.parse_image(blob).kernels)
            except ValueError:
                names = []
            where[ref.sha256] = len(stored)
            stored.append(StoredImage(blob, ref.sha256, names))
        key = (ref.sha256, ref.name)
        if key not in attrs_of:
            attrs_of[key] = dict(ref.attributes)
        elif attrs_of[key] != ref.attributes:
            attrs_of[key] = _merge_attributes(ref.name, attrs_of[key], ref.attributes)
    functions = [KernelFunction(image=where[sha], name=name, attributes=attrs)
                 for (sha, name), attrs in attrs_of.items()]
    return stored, functions


def _merge_attributes(name: str, a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    merged = {**a, **b}
    for key in merged:
        if key == ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES:
            merged[key] = max(a.get(key, 0), b.get(key, 0))
        elif a.get(key) != b.get(key):
            raise UnsupportedGraph(f"kernel {name}: two loaded copies have different values of attribute {key} "
                                   f"({a.get(key, 'default')} and {b.get(key, 'default')}); one archived function "
                                   "cannot have both")
    return merged


# ---------------------------------------------------------------------------
# LOAD
# ---------------------------------------------------------------------------


def loading_mode() -> str:
    """"lazy" or "eager": the driver's module loading mode (CUDA_MODULE_LOADING)."""
    drv = _drv()
    mode = _call("cuModuleGetLoadingMode", drv.cuModuleGetLoadingMode)
    return "lazy" if int(mode) == int(drv.CUmoduleLoadingMode.CU_MODULE_LAZY_LOADING) else "eager"


def load_images(images: Sequence[bytes]) -> list[int]:
    """Load each image as a module into the current context; returns the CUmodule handles."""
    drv = _drv()
    t0 = time.perf_counter()
    modules = []
    try:
        for i, data in enumerate(images):
            modules.append(int(_call(f"cuModuleLoadData(image #{i}, {len(data)} bytes)", drv.cuModuleLoadData, data)))
    except FoundryError:
        unload_modules(modules)
        raise
    log.info("loaded %d kernel images (%.1f MB) in %.3f s", len(modules), sum(map(len, images)) / 1e6,
             time.perf_counter() - t0)
    return modules


def get_functions(modules: Sequence[int], functions: Sequence[KernelFunction], load: bool = True) -> list[int]:
    """CUfunction handles for the archived functions, with their recorded attributes applied.

    ``load=True`` forces lazily loaded functions onto the device now (cuFuncLoad), so the first replay
    does not pay for it.
    """
    drv = _drv()
    t0 = time.perf_counter()
    out = []
    for fn in functions:
        if not 0 <= fn.image < len(modules):
            raise FoundryError(f"kernel {fn.name} refers to image #{fn.image}, but only {len(modules)} are loaded")
        func = _call(f"cuModuleGetFunction({fn.name})", drv.cuModuleGetFunction, drv.CUmodule(modules[fn.image]),
                     fn.name.encode("utf-8", errors="surrogateescape"))
        for attr in sorted(fn.attributes, key=_attribute_order):
            _call(f"cuFuncSetAttribute({fn.name}, {attr}={fn.attributes[attr]})", drv.cuFuncSetAttribute, func,
                  drv.CUfunction_attribute(attr), int(fn.attributes[attr]))
        if load and hasattr(drv, "cuFuncLoad"):
            _call(f"cuFuncLoad({fn.name})", drv.cuFuncLoad, func)
        out.append(int(func))
    log.info("resolved %d kernel functions in %.3f s", len(out), time.perf_counter() - t0)
    return out


def load_kernels(images: Sequence[bytes | bytearray], functions: Sequence[KernelFunction], lib=None,
                 load: bool = True) -> tuple[list[int], list[int]]:
    """:func:`load_images` then :func:`get_functions`: ``(modules, function handles)``; on failure nothing stays
    loaded. ``lib`` (``foundry_core.native.native_lib()``): the same driver calls in one native call, which
    releases the GIL once instead of around each of hundreds of calls (a thread beside a busy importing thread
    waits up to a switch interval to win it back after each)."""
    for fn in functions:  # checked before anything is loaded, on either path
        if not 0 <= fn.image < len(images):
            raise FoundryError(f"kernel {fn.name} refers to image #{fn.image}, but only {len(images)} are loaded")
        for attr, value in fn.attributes.items():
            if not (-2**31 <= int(attr) < 2**31 and -2**31 <= int(value) < 2**31):
                raise DriverError(f"cuFuncSetAttribute({fn.name}, {attr}={value}) failed: value out of range")
    if lib is None:
        modules = load_images(images)
        try:
            return modules, get_functions(modules, functions, load)
        except BaseException:
            unload_modules(modules)
            raise
    t0 = time.perf_counter()
    keep = []  # the buffers whose addresses the call reads
    addresses = (ctypes.c_void_p * max(1, len(images)))()
    sizes = (ctypes.c_uint64 * max(1, len(images)))()
    for i, data in enumerate(images):
        buf = data if isinstance(data, bytes) else (ctypes.c_char * len(data)).from_buffer(data)
        keep.append(buf)
        addresses[i] = ctypes.cast(ctypes.c_char_p(buf) if isinstance(buf, bytes) else buf, ctypes.c_void_p).value
        sizes[i] = len(data)
    n = len(functions)
    image_of = (ctypes.c_uint32 * max(1, n))()
    names = (ctypes.c_char_p * max(1, n))()
    offsets = (ctypes.c_uint32 * (n + 1))()
    ids, values = [], []
    for f, fn in enumerate(functions):
        image_of[f] = fn.image
        names[f] = fn.name.encode("utf-8", errors="surrogateescape")
        for attr in sorted(fn.attributes, key=_attribute_order):
            ids.append(int(attr))
            values.append(int(fn.attributes[attr]))
        offsets[f + 1] = len(ids)
    attr_ids = (ctypes.c_int32 * max(1, len(ids)))(*ids)
    attr_values = (ctypes.c_int64 * max(1, len(values)))(*values)
    modules = (ctypes.c_uint64 * max(1, len(images)))()
    handles = (ctypes.c_uint64 * max(1, n))()
    err = ctypes.create_string_buffer(512)
    if lib.foundry_load_kernels(len(images), addresses, sizes, n, image_of, names, offsets, attr_ids, attr_values,
                                int(load), modules, handles, err, len(err)) != 0:
        raise DriverError(err.value.decode(errors="replace"))
    log.info("loaded %d kernel images (%.1f MB) and resolved %d functions in %.3f s (one native call)",
             len(images), sum(map(len, images)) / 1e6, n, time.perf_counter() - t0)
    return list(modules)[:len(images)], list(handles)[:n]


def _attribute_order(attr: int) -> int:
    return SETTABLE_ATTRIBUTES.index(attr) if attr in SETTABLE_ATTRIBUTES else len(SETTABLE_ATTRIBUTES) + attr


def unload_modules(modules: Iterable[int]) -> None:
    """Unload modules from :func:`load_images` (errors are logged, not raised)."""
    drv = _drv()
    for m in modules:
        try:
            _call("cuModuleUnload", drv.cuModuleUnload, drv.CUmodule(m))
        except FoundryError as err:
            log.warning("%s", err)
