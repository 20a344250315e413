"""Read CUDA module images: ELF cubins, fatbin containers and PTX, in pure Python.

``parse_image(data)`` tells what an image is and which kernels (entry points) it
defines, with what the ELF records about each: registers, static shared memory,
constant bank 0 / parameter size, local frame, launch bounds, cluster shape.
Nothing here needs a GPU; :mod:`foundry_core.images` uses it to find which
captured image a live ``CUfunction`` came from.

Layouts read here (little-endian):

* ELF64 with ``e_machine == EM_CUDA``. The SM arch sits in ``e_flags``: bits 0-7
  for ABI version 7 (CUDA <= 12), bits 8-15 for ABI version 8 (CUDA 13).
  Kernels are ``STT_FUNC`` symbols with the ``STO_CUDA_ENTRY`` bit in
  ``st_other``; their code is ``.text.<name>``, and ``.nv.info.<name>`` /
  ``.nv.shared.<name>`` / ``.nv.constant0.<name>`` point back at that section
  through ``sh_info``. ``.nv.info*`` sections are lists of attributes
  ``{u8 format, u8 id, value}``: formats 1-3 carry a 2-byte value, format 4 a
  u16 length and that many bytes.
* Module-scope data (``GlobalVar``): ``STT_OBJECT`` symbols in ``.nv.global`` (``__device__`` without an
  initialiser: NOBITS, zero at load), ``.nv.global.init`` (``__device__`` with one) and ``.nv.constant<N>`` banks
  without a kernel suffix (``__constant__``: bank 3 with nvcc 13). ``st_value`` is the offset in the section.
  A library may write such a variable after loading its module (``cudaMemcpyToSymbol``) or hand its address
  to kernels as an argument; a fresh load of the image at LOAD has neither the written value nor the address.
* Fatbin: ``{u32 magic 0xBA55ED50, u16 version, u16 header size, u64 body size}``
  followed by entries ``{u16 kind (1 PTX, 2 ELF), u16, u32 header size,
  u64 payload size, u32 compressed size, u32, u32 version, u32 arch, u32, u32,
  u64 flags, u64, u64 uncompressed size}``. Flag 0x2000 marks an LZ4 payload,
  0x8000 a zstd payload (CUDA 13's default).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

ELF_MAGIC = b"\x7fELF"
FATBIN_MAGIC = 0xBA55ED50
FATBIN_WRAPPER_MAGIC = 0x466243B1  # __fatBinC_Wrapper_t: a pointer wrapper, not an image
EM_CUDA = 190

SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_NOBITS = 8
SHT_REL = 9
SHF_INFO_LINK = 0x40
STT_OBJECT = 1
STT_FUNC = 2
STO_CUDA_ENTRY = 0x10

# .nv.info attribute formats and the ids this module reads.
EIFMT_SVAL = 4
EIATTR_MAX_THREADS = 0x05
EIATTR_PARAM_CBANK = 0x0A
EIATTR_REQNTID = 0x10
EIATTR_FRAME_SIZE = 0x11
EIATTR_MIN_STACK_SIZE = 0x12
EIATTR_KPARAM_INFO = 0x17
EIATTR_CBANK_PARAM_SIZE = 0x19
EIATTR_MAXREG_COUNT = 0x1B
EIATTR_REGCOUNT = 0x2F
EIATTR_CTA_PER_CLUSTER = 0x3D
EIATTR_EXPLICIT_CLUSTER = 0x3E

FATBIN_KIND_PTX = 1
FATBIN_KIND_ELF = 2
FATBIN_FLAG_LZ4 = 0x2000
FATBIN_FLAG_ZSTD = 0x8000

#: Refuse absurd sizes before allocating anything for them.
MAX_UNCOMPRESSED = 1 << 31
MAX_SECTIONS = 1 << 20

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_FATBIN_HEADER = struct.Struct("<IHHQ")
_FATBIN_ENTRY = struct.Struct("<HHIQ")


@dataclass(frozen=True)
class KernelInfo:
    """What the image says about one kernel. ``-1`` means the image does not say."""

    name: str
    registers: int = -1
    #: static shared memory (size of ``.nv.shared.<name>``; on sm_90+ this can include the 1 KiB the system reserves)
    shared_bytes: int = 0
    #: size of ``.nv.constant0.<name>``: driver-reserved words plus the kernel parameters
    const0_bytes: int = -1
    param_bytes: int = -1
    #: offset of the parameters inside constant bank 0
    param_offset: int = -1
    #: per-thread local memory frame (EIATTR_FRAME_SIZE)
    frame_bytes: int = -1
    max_registers: int = -1
    max_threads: tuple[int, int, int] | None = None  # __launch_bounds__ / .maxntid
    req_threads: tuple[int, int, int] | None = None  # .reqntid
    cluster_dims: tuple[int, int, int] | None = None  # __cluster_dims__


@dataclass(frozen=True)
class GlobalVar:
    """A module-scope variable of a cubin (``__device__`` or ``__constant__``), as the ELF declares it."""

    name: str  # the symbol name cuModuleGetGlobal takes (mangled)
    section: str  # ".nv.global", ".nv.global.init" or ".nv.constant<N>"
    offset: int  # st_value: offset inside its section
    size: int
    initial: bytes  # what the image holds: the section bytes, zeros for .nv.global (NOBITS)
    #: offsets (inside the variable) of the 8-byte words a relocation patches at load — e.g. ``int* p = &x``:
    #: their live value is an address, never the image's bytes
    relocated: tuple[int, ...] = ()

    def same_as_loaded(self, live: bytes) -> bool:
        """Whether ``live`` bytes are what a fresh load of the image holds, relocated words aside."""
        if len(live) != len(self.initial):
            return False
        if not self.relocated:
            return live == self.initial
        a, b = bytearray(live), bytearray(self.initial)
        for off in self.relocated:
            a[off:off + 8] = b[off:off + 8] = bytes(len(a[off:off + 8]))
        return a == b

    @property
    def kind(self) -> str:
        """"device" (writable global memory) or "constant" (a constant bank, written only from the host)."""
        return "constant" if self.section.startswith(".nv.constant") else "device"


@dataclass(frozen=True)
class FatbinEntry:
    """One entry of a fatbin container."""

    kind: str  # "elf", "ptx" or "kind<N>"
    arch: int  # SM number, e.g. 90
    compression: str  # "" (none), "lz4", "zstd" or "unknown"
    size: int  # uncompressed size (when known), else the stored size
    #: the uncompressed payload; None when it is compressed with a codec this process cannot decode
    data: bytes | None
    note: str = ""


@dataclass(frozen=True)
class ImageInfo:
    """A parsed module image.

    ``kind`` is "elf", "fatbin" or "ptx". For a fatbin, ``elves`` holds its parsed
    ELF entries, ``arch`` is the highest ELF arch, and ``kernels`` are that entry's
    kernels (use :meth:`for_arch` to pick the one a given GPU loads).
    ``notes`` lists what could not be read (e.g. an entry compressed with zstd
    when no zstd decoder is installed).
    """

    kind: str
    arch: int
    kernels: dict[str, KernelInfo]
    abi_version: int = 0
    entries: tuple[FatbinEntry, ...] = ()
    elves: tuple["ImageInfo", ...] = ()
    notes: tuple[str, ...] = ()
    complete: bool = True  # False when some entry could not be parsed
    #: module-scope variables by symbol name (ELF only; a fatbin's are those of its chosen ELF, see for_arch)
    globals: dict[str, GlobalVar] = field(default_factory=dict)

    @property
    def kernel_names(self) -> frozenset[str]:
        return frozenset(self.kernels)

    def for_arch(self, arch: int) -> "ImageInfo | None":
        """The ELF the driver would load on an ``sm_<arch>`` GPU: exact arch, else the newest
        older arch of the same major version. PTX-only images (JIT) and unreadable fatbins give None
        unless their kernel names are known (PTX)."""
        if self.kind == "elf":
            return self if _arch_loads_on(self.arch, arch) else None
        if self.kind == "ptx":
            return self
        usable = [e for e in self.elves if _arch_loads_on(e.arch, arch)]
        if usable:
            return max(usable, key=lambda e: e.arch)
        ptx = [e for e in self.entries if e.kind == "ptx" and e.data is not None and e.arch <= arch]
        if ptx:
            try:
                return parse_ptx(max(ptx, key=lambda e: e.arch).data)
            except ValueError:  # unreadable PTX: as an unreadable fatbin, nothing the driver would load is known
                return None
        return None


def _arch_loads_on(image_arch: int, device_arch: int) -> bool:
    return image_arch == device_arch or (image_arch // 10 == device_arch // 10 and image_arch < device_arch)


def decode_name(raw: bytes) -> str:
    """Kernel names as str, the same way for ELF symbols and ``cuFuncGetName`` results."""
    return raw.decode("utf-8", errors="surrogateescape")


def parse_image(data: bytes | bytearray | memoryview) -> ImageInfo:
    """Parse a module image (ELF cubin, fatbin container or PTX text).

    Raises ValueError with a one-line reason for anything that is not a well-formed image.
    """
    data = bytes(data)
    if len(data) < 4:
        raise ValueError(f"not a CUDA module image: only {len(data)} bytes")
    head = data[:4]
    try:
        if head == ELF_MAGIC:
            return parse_elf(data)
        magic = struct.unpack_from("<I", data, 0)[0]
        if magic == FATBIN_MAGIC:
            return parse_fatbin(data)
        if magic == FATBIN_WRAPPER_MAGIC:
            raise ValueError("a fatbin wrapper (__fatBinC_Wrapper_t) holds a pointer, not the image itself")
        if _looks_like_ptx(data):
            return parse_ptx(data)
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as err:  # belt and braces
        raise ValueError(f"malformed CUDA module image: {err}") from None
    raise ValueError(f"not a CUDA module image (starts with {data[:8].hex()})")


# ---------------------------------------------------------------------------
# ELF
# ---------------------------------------------------------------------------


@dataclass
class _Section:
    index: int
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data = data
        self.what = what

    def unpack(self, fmt: struct.Struct, offset: int) -> tuple:
        if offset < 0 or offset + fmt.size > len(self.data):
            raise ValueError(f"truncated {self.what}: need {fmt.size} bytes at offset {offset}, have {len(self.data)}")
        return fmt.unpack_from(self.data, offset)

    def slice(self, offset: int, size: int, label: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise ValueError(f"truncated {self.what}: {label} [{offset}, {offset + size}) "
                             f"beyond {len(self.data)} bytes")
        return self.data[offset : offset + size]


def _cstr(table: bytes, offset: int, what: str) -> str:
    if offset < 0 or offset >= len(table):
        if offset == 0 and not table:
            return ""
        raise ValueError(f"malformed cubin: {what} name offset {offset} outside its string table")
    end = table.find(b"\0", offset)
    if end < 0:
        raise ValueError(f"malformed cubin: unterminated {what} name")
    return decode_name(table[offset:end])


def elf_arch(e_flags: int, abi_version: int) -> int:
    """SM number from a CUDA ELF's e_flags (bits 8-15 since ABI 8, bits 0-7 before)."""
    return (e_flags >> 8) & 0xFF if abi_version >= 8 else e_flags & 0xFF


def parse_elf(data: bytes) -> ImageInfo:
    """Parse one ELF64 cubin. See the module docstring for the layout."""
    r = _Reader(data, "cubin")
    (ident, e_type, e_machine, _ver, _entry, phoff, shoff, e_flags, _ehsize, phentsize, phnum,
     shentsize, shnum, shstrndx) = r.unpack(_ELF_HEADER, 0)
    if ident[:4] != ELF_MAGIC:
        raise ValueError("not an ELF image")
    if ident[4] != 2 or ident[5] != 1:
        raise ValueError("not a little-endian ELF64 cubin")
    if e_machine != EM_CUDA:
        raise ValueError(f"ELF for machine {e_machine}, not a CUDA cubin (EM_CUDA={EM_CUDA})")
    abi = ident[8]
    if shnum == 0 or shnum > MAX_SECTIONS:
        raise ValueError(f"malformed cubin: {shnum} sections")
    if shentsize < _SECTION.size:
        raise ValueError(f"malformed cubin: section header size {shentsize}")
    if shstrndx >= shnum:
        raise ValueError(f"malformed cubin: section name table index {shstrndx} >= {shnum}")
    if phnum:  # the driver maps the image through its program headers: the table must lie inside the image
        r.slice(phoff, phnum * phentsize, "program header table")

    raw = [r.unpack(_SECTION, shoff + i * shentsize) for i in range(shnum)]
    s_name, s_type, _f, _a, s_off, s_size = raw[shstrndx][:6]
    shstr = r.slice(s_off, s_size, "section name table")
    sections: list[_Section] = []
    for i, (name, typ, flags, _addr, off, size, link, info, _align, entsize) in enumerate(raw):
        if typ != SHT_NOBITS and i != 0:
            r.slice(off, size, f"section {i}")  # bounds check
        sections.append(_Section(i, _cstr(shstr, name, "section") if i else "", typ, flags, off, size, link, info,
                                 entsize))

    symbols = _read_symbols(r, sections)
    module_globals = _module_globals(r, sections, _read_symbol_values(r, sections), symbols)
    per_symbol = _per_symbol_values(_parse_nv_info_records(r, sections, ".nv.info"))

    # Kernels: entry-flagged function symbols whose section exists.
    kernels: dict[str, KernelInfo] = {}
    by_text: dict[int, tuple[int, str]] = {}  # text section index -> (symbol index, name)
    for sym_index, (name, st_info, st_other, st_shndx) in enumerate(symbols):
        if st_info & 0xF != STT_FUNC or not st_other & STO_CUDA_ENTRY:
            continue
        if not 0 < st_shndx < len(sections):
            continue
        by_text[st_shndx] = (sym_index, name)
    if not by_text:
        # Toolchains that do not set STO_CUDA_ENTRY: a .text.<name> whose .nv.info.<name> exists marks an entry.
        info_names = {s.name[len(".nv.info."):] for s in sections if s.name.startswith(".nv.info.")}
        for sym_index, (name, st_info, _other, st_shndx) in enumerate(symbols):
            if (st_info & 0xF == STT_FUNC and name in info_names and 0 < st_shndx < len(sections)
                    and sections[st_shndx].name == ".text." + name):
                by_text[st_shndx] = (sym_index, name)

    per_kernel: dict[int, dict[str, object]] = {t: {} for t in by_text}
    text_by_name = {sections[t].name: t for t in by_text}
    for s in sections:
        target = _owner_text_section(s, text_by_name, by_text)
        if target is None:
            continue
        if s.name.startswith(".nv.shared.") and not s.name.startswith(".nv.shared.reserved"):
            per_kernel[target]["shared_bytes"] = s.size
        elif s.name.startswith(".nv.constant0."):
            per_kernel[target]["const0_bytes"] = s.size
        elif s.name.startswith(".nv.info."):
            per_kernel[target]["info"] = _parse_nv_info(r.slice(s.offset, s.size, s.name), s.name)

    for text_index, (sym_index, name) in by_text.items():
        text = sections[text_index]
        facts = per_kernel[text_index]
        attrs = facts.get("info", [])
        regs = text.info >> 24  # older toolchains keep the register count in the top byte
        if not regs:
            regs = per_symbol.get((EIATTR_REGCOUNT, sym_index),
                                  _per_symbol_values(attrs).get((EIATTR_REGCOUNT, sym_index), -1))
        kparams = [_kparam(v) for a, v in attrs if a == EIATTR_KPARAM_INFO and isinstance(v, bytes)]
        param_bytes, param_offset = _param_size(attrs, kparams)
        kernels[name] = KernelInfo(
            name=name,
            registers=regs,
            shared_bytes=int(facts.get("shared_bytes", 0)),
            const0_bytes=int(facts.get("const0_bytes", -1)),
            param_bytes=param_bytes,
            param_offset=param_offset,
            frame_bytes=per_symbol.get((EIATTR_FRAME_SIZE, sym_index),
                                       _per_symbol_values(attrs).get((EIATTR_FRAME_SIZE, sym_index), -1)),
            max_registers=_hval(attrs, EIATTR_MAXREG_COUNT),
            max_threads=_dim3(attrs, EIATTR_MAX_THREADS),
            req_threads=_dim3(attrs, EIATTR_REQNTID),
            cluster_dims=_dim3(attrs, EIATTR_CTA_PER_CLUSTER),
        )
    return ImageInfo(kind="elf", arch=elf_arch(e_flags, abi), kernels=kernels, abi_version=abi,
                     globals=module_globals)


_MODULE_BANK = re.compile(r"\.nv\.constant\d+$")


def is_module_data_section(name: str) -> bool:
    """Sections that hold module-scope variables: global memory and the constant banks of no one kernel
    (``.nv.constant0.<kernel>`` holds a kernel's parameters, ``.nv.shared.*``/``.nv.local.*`` are per launch)."""
    return name in (".nv.global", ".nv.global.init") or bool(_MODULE_BANK.match(name))


def _relocated_offsets(r: _Reader, sections: list[_Section]) -> dict[int, list[int]]:
    """{target section index: r_offset of each relocation applied to it} from the .rel/.rela sections."""
    out: dict[int, list[int]] = {}
    for s in sections:
        if s.type not in (SHT_REL, SHT_RELA) or not 0 < s.info < len(sections):
            continue
        entsize = s.entsize or (24 if s.type == SHT_RELA else 16)
        if entsize < 16:
            raise ValueError(f"malformed cubin: relocation entry size {entsize} in {s.name}")
        out.setdefault(s.info, []).extend(struct.unpack_from("<Q", r.slice(s.offset + k * entsize, 8, s.name))[0]
                                          for k in range(s.size // entsize))
    return out


def _module_globals(r: _Reader, sections: list[_Section], values: list[tuple[int, int]],
                    symbols: list[tuple[str, int, int, int]]) -> dict[str, GlobalVar]:
    out: dict[str, GlobalVar] = {}
    relocs: dict[int, list[int]] | None = None
    for (name, st_info, _other, st_shndx), (value, size) in zip(symbols, values):
        if st_info & 0xF != STT_OBJECT or not name or not 0 < st_shndx < len(sections):
            continue
        sec = sections[st_shndx]
        if not is_module_data_section(sec.name):
            continue
        if value + size > sec.size:
            raise ValueError(f"malformed cubin: variable {name} [{value}, {value + size}) outside {sec.name} "
                             f"({sec.size} bytes)")
        initial = bytes(size) if sec.type == SHT_NOBITS else r.slice(sec.offset + value, size, f"variable {name}")
        if relocs is None:
            relocs = _relocated_offsets(r, sections)
        patched = tuple(sorted(o - value for o in relocs.get(st_shndx, ()) if value <= o < value + size))
        out[name] = GlobalVar(name, sec.name, value, size, initial, patched)
    return out


def _read_symbol_values(r: _Reader, sections: list[_Section]) -> list[tuple[int, int]]:
    """(st_value, st_size) of every symbol, in the order of :func:`_read_symbols`."""
    symtabs = [s for s in sections if s.type == SHT_SYMTAB]
    if not symtabs:
        return []
    st = symtabs[0]
    entsize = st.entsize or _SYMBOL.size
    return [tuple(r.unpack(_SYMBOL, st.offset + i * entsize)[4:6]) for i in range(st.size // entsize)]


def _read_symbols(r: _Reader, sections: list[_Section]) -> list[tuple[str, int, int, int]]:
    symtabs = [s for s in sections if s.type == SHT_SYMTAB]
    if not symtabs:
        return []
    st = symtabs[0]
    if st.link >= len(sections) or sections[st.link].type != SHT_STRTAB:
        raise ValueError("malformed cubin: symbol table without a string table")
    strtab = r.slice(sections[st.link].offset, sections[st.link].size, "symbol string table")
    entsize = st.entsize or _SYMBOL.size
    if entsize < _SYMBOL.size:
        raise ValueError(f"malformed cubin: symbol entry size {entsize}")
    out = []
    for i in range(st.size // entsize):
        name, st_info, st_other, st_shndx, _value, _size = r.unpack(_SYMBOL, st.offset + i * entsize)
        out.append((_cstr(strtab, name, "symbol") if name else "", st_info, st_other, st_shndx))
    return out


def _owner_text_section(s: _Section, text_by_name: dict[str, int], by_text: dict) -> int | None:
    """The kernel text section a per-kernel section (.nv.info.X, .nv.shared.X, .nv.constant0.X) belongs to."""
    if s.flags & SHF_INFO_LINK and s.info in by_text:
        return s.info
    for prefix in (".nv.info.", ".nv.shared.", ".nv.constant0."):
        if s.name.startswith(prefix):
            return text_by_name.get(".text." + s.name[len(prefix):])
    return None


def _parse_nv_info_records(r: _Reader, sections: list[_Section], name: str) -> list[tuple[int, object]]:
    out: list[tuple[int, object]] = []
    for s in sections:
        if s.name == name:
            out += _parse_nv_info(r.slice(s.offset, s.size, name), name)
    return out


def _parse_nv_info(blob: bytes, where: str) -> list[tuple[int, object]]:
    """Attribute list of an .nv.info section: (id, int for 2-byte values | bytes for sized values)."""
    out: list[tuple[int, object]] = []
    pos = 0
    while pos + 4 <= len(blob):
        fmt, attr = blob[pos], blob[pos + 1]
        if fmt == EIFMT_SVAL:
            size = struct.unpack_from("<H", blob, pos + 2)[0]
            if pos + 4 + size > len(blob):
                raise ValueError(f"malformed cubin: attribute 0x{attr:x} in {where} overruns the section")
            out.append((attr, blob[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        elif fmt in (1, 2, 3):
            out.append((attr, struct.unpack_from("<H", blob, pos + 2)[0]))
            pos += 4
        else:
            raise ValueError(f"malformed cubin: unknown attribute format {fmt} in {where}")
    return out


def _per_symbol_values(attrs: list[tuple[int, object]]) -> dict[tuple[int, int], int]:
    """{(attribute id, symbol index): value} of the {u32 symbol, u32 value} attributes (REGCOUNT, FRAME_SIZE, ...)."""
    out: dict[tuple[int, int], int] = {}
    for a, v in attrs:
        if a in (EIATTR_REGCOUNT, EIATTR_FRAME_SIZE, EIATTR_MIN_STACK_SIZE) and isinstance(v, bytes) and len(v) >= 8:
            sym, value = struct.unpack_from("<II", v, 0)
            out.setdefault((a, sym), value)
    return out


def _hval(attrs: list[tuple[int, object]], attr_id: int) -> int:
    for a, v in attrs:
        if a == attr_id and isinstance(v, int):
            return v
    return -1


def _dim3(attrs: list[tuple[int, object]], attr_id: int) -> tuple[int, int, int] | None:
    for a, v in attrs:
        if a == attr_id and isinstance(v, bytes) and len(v) >= 12:
            return struct.unpack_from("<III", v, 0)
    return None


def _kparam(v: bytes) -> tuple[int, int, int]:
    """(ordinal, offset, size) from an EIATTR_KPARAM_INFO value."""
    if len(v) < 12:
        raise ValueError("malformed cubin: short KPARAM_INFO attribute")
    _index, ordinal, offset, packed = struct.unpack_from("<IHHI", v, 0)
    return ordinal, offset, (packed >> 18) & 0x3FFF


def _param_size(attrs: list[tuple[int, object]], kparams: list[tuple[int, int, int]]) -> tuple[int, int]:
    size = _hval(attrs, EIATTR_CBANK_PARAM_SIZE)
    offset = -1
    for a, v in attrs:
        if a == EIATTR_PARAM_CBANK and isinstance(v, bytes) and len(v) >= 8:
            packed = struct.unpack_from("<I", v, 4)[0]
            offset = packed & 0xFFFF
            if size < 0:
                size = packed >> 16
    if size < 0 and kparams:
        size = max(off + sz for _o, off, sz in kparams)
    if size < 0 and not any(a == EIATTR_PARAM_CBANK for a, _ in attrs) and attrs:
        size = 0  # kernels without parameters carry no parameter attributes at all
    return size, offset


# ---------------------------------------------------------------------------
# PTX
# ---------------------------------------------------------------------------

_PTX_ENTRY = re.compile(rb"\.entry\s+([A-Za-z_$%][\w$%.]*)")
_PTX_TARGET = re.compile(rb"\.target\s+sm_(\d+)")


def _looks_like_ptx(data: bytes) -> bool:
    head = data[:4096]
    return b".version" in head and b".target" in head


def parse_ptx(data: bytes) -> ImageInfo:
    """Kernel names (``.entry``) and target of a PTX text; resource facts are unknown before JIT."""
    text = bytes(data).split(b"\0", 1)[0]
    if not _looks_like_ptx(text):
        raise ValueError("not PTX text (no .version/.target directive)")
    target = _PTX_TARGET.search(text)
    names = [decode_name(m.group(1)) for m in _PTX_ENTRY.finditer(text)]
    return ImageInfo(kind="ptx", arch=int(target.group(1)) if target else 0,
                     kernels={n: KernelInfo(name=n, shared_bytes=-1) for n in names})


# ---------------------------------------------------------------------------
# Fatbin
# ---------------------------------------------------------------------------


def parse_fatbin_entries(data: bytes) -> list[FatbinEntry]:
    """All entries of the fatbin container(s) in ``data``, payloads decompressed when possible."""
    r = _Reader(data, "fatbin")
    entries: list[FatbinEntry] = []
    pos = 0
    while pos + _FATBIN_HEADER.size <= len(data):
        magic, _version, header_size, body_size = r.unpack(_FATBIN_HEADER, pos)
        if magic != FATBIN_MAGIC:
            if pos == 0:
                raise ValueError("not a fatbin (bad magic)")
            if data[pos:].strip(b"\0"):
                raise ValueError(f"malformed fatbin: unexpected bytes at offset {pos}")
            break
        if header_size < _FATBIN_HEADER.size:
            raise ValueError(f"malformed fatbin: header size {header_size}")
        start, end = pos + header_size, pos + header_size + body_size
        if end > len(data):
            raise ValueError(f"truncated fatbin: container needs {end} bytes, have {len(data)}")
        off = start
        while off < end:
            entry, off = _read_fatbin_entry(r, off, end)
            entries.append(entry)
        pos = (end + 7) & ~7
    if not entries:
        raise ValueError("fatbin without entries")
    return entries


def _read_fatbin_entry(r: _Reader, off: int, end: int) -> tuple[FatbinEntry, int]:
    kind_id, _ver, header_size, payload_size = r.unpack(_FATBIN_ENTRY, off)
    if header_size < 32 or off + header_size + payload_size > end:
        raise ValueError(f"malformed fatbin: entry at offset {off} (header {header_size}, payload {payload_size}) "
                         f"overruns its container")
    compressed_size, _u, _version, arch = struct.unpack_from("<IIII", r.data, off + 16)
    flags = uncompressed = 0
    if header_size >= 64:
        flags = struct.unpack_from("<Q", r.data, off + 40)[0]
        uncompressed = struct.unpack_from("<Q", r.data, off + 56)[0]
    kind = {FATBIN_KIND_ELF: "elf", FATBIN_KIND_PTX: "ptx"}.get(kind_id, f"kind{kind_id}")
    payload = r.slice(off + header_size, payload_size, "fatbin entry payload")
    next_off = off + header_size + payload_size
    if flags & FATBIN_FLAG_LZ4:
        codec = "lz4"
    elif flags & FATBIN_FLAG_ZSTD:
        codec = "zstd"
    else:
        return FatbinEntry(kind, arch, "", len(payload), payload), next_off
    if not 0 < compressed_size <= payload_size or not 0 < uncompressed <= MAX_UNCOMPRESSED:
        raise ValueError(f"malformed fatbin: {codec} entry with stored size {compressed_size}, "
                         f"uncompressed size {uncompressed}")
    packed = payload[:compressed_size]
    try:
        data = _decompress(codec, packed, uncompressed)
    except ValueError as err:
        raise ValueError(f"malformed fatbin: sm_{arch} {kind} entry: {err}") from None
    note = "" if data is not None else \
        f"sm_{arch} {kind} entry is {codec}-compressed and no {codec} decoder is installed"
    return FatbinEntry(kind, arch, codec, uncompressed, data, note), next_off


def _decompress(codec: str, packed: bytes, size: int) -> bytes | None:
    if codec == "lz4":
        return lz4_block_decompress(packed, size)
    zstd = _zstd_module()
    if zstd is None:
        return None
    try:
        if zstd.__name__ == "zstandard":
            out = zstd.ZstdDecompressor().decompress(packed, max_output_size=size)
        else:
            out = zstd.decompress(packed)
    except Exception as err:  # the decoders raise their own error types
        raise ValueError(f"zstd payload does not decompress ({err})") from None
    if len(out) != size:
        raise ValueError(f"zstd payload gave {len(out)} bytes, header says {size}")
    return out


def _zstd_module():
    """A zstd decoder if one is importable (Python 3.14's compression.zstd, or the zstandard package)."""
    for name in ("compression.zstd", "zstandard"):
        try:
            return __import__(name, fromlist=["_"])
        except ImportError:
            continue
    return None



def _lz4_length(src, i: int, value: int) -> tuple[int, int]:
    """LZ4's extended length: a 4-bit field of 15 continues in bytes until one is not 255."""
    if value == 15:
        while True:
            b = src[i]
            i += 1
            value += b
            if b != 255:
                break
    return value, i

def lz4_block_decompress(src: bytes, size: int) -> bytes:
    """Decode one raw LZ4 block (no frame header) that must expand to exactly ``size`` bytes."""
    out = bytearray()
    i, n = 0, len(src)
    try:
        while i < n:
            token = src[i]
            i += 1
            literals, i = _lz4_length(src, i, token >> 4)
            if i + literals > n:
                raise ValueError("LZ4 literal run past the end of the block")
            out += src[i : i + literals]
            i += literals
            if i >= n:
                break  # the last sequence carries literals only
            offset = src[i] | (src[i + 1] << 8)
            i += 2
            if offset == 0 or offset > len(out):
                raise ValueError(f"LZ4 match offset {offset} outside the {len(out)} bytes decoded so far")
            length, i = _lz4_length(src, i, token & 15)
            length += 4
            if len(out) + length > size:
                raise ValueError(f"LZ4 block expands beyond the declared {size} bytes")
            start = len(out) - offset
            if offset >= length:
                out += out[start : start + length]
            else:  # overlapping copy repeats the last `offset` bytes
                pattern = bytes(out[start:])
                out += (pattern * (length // offset + 1))[:length]
    except IndexError:
        raise ValueError("LZ4 block truncated") from None
    if len(out) != size:
        raise ValueError(f"LZ4 block gave {len(out)} bytes, header says {size}")
    return bytes(out)


def parse_fatbin(data: bytes) -> ImageInfo:
    """Parse a fatbin container: every entry, and each readable ELF entry as an ImageInfo."""
    entries = parse_fatbin_entries(data)
    elves: list[ImageInfo] = []
    notes = [e.note for e in entries if e.note]
    for e in entries:
        if e.kind == "elf" and e.data is not None:
            try:
                elves.append(parse_elf(e.data))
            except ValueError as err:
                raise ValueError(f"fatbin sm_{e.arch} ELF entry: {err}") from None
    best = max(elves, key=lambda x: x.arch) if elves else None
    complete = all(e.data is not None for e in entries)
    return ImageInfo(kind="fatbin", arch=best.arch if best else max((e.arch for e in entries), default=0),
                     kernels=dict(best.kernels) if best else {}, abi_version=best.abi_version if best else 0,
                     entries=tuple(entries), elves=tuple(elves), notes=tuple(notes), complete=complete,
                     globals=dict(best.globals) if best else {})


def elf_entries(data: bytes) -> list[bytes]:
    """The uncompressed ELF images inside a fatbin (compressed entries that cannot be decoded are left out)."""
    return [e.data for e in parse_fatbin_entries(data) if e.kind == "elf" and e.data is not None]
