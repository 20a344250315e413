"""foundry_core.cubin against images nvcc builds at test time (skipped without nvcc)."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foundry_core import cubin

KERNELS_CU = r"""
__device__ __noinline__ float helper(float x) { return x * x + 1.0f; }

extern "C" __global__ void plain_add(float* a, const float* b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) a[i] += helper(b[i]);
}

extern "C" __global__ void with_shared(float* out, const float* in) {
  __shared__ float tile[1024];
  tile[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[1023 - threadIdx.x];
}

template <typename T> __global__ void fill(T* p, T v) { p[threadIdx.x] = v; }
template __global__ void fill<int>(int*, int);
template __global__ void fill<double>(double*, double);

extern "C" __global__ void many_regs(double* out, const double* in, int n) {
  double acc[48];
#pragma unroll
  for (int k = 0; k < 48; ++k) acc[k] = in[threadIdx.x + k * n];
  for (int it = 0; it < n; ++it) {
#pragma unroll
    for (int k = 0; k < 48; ++k) acc[k] = acc[k] * acc[(k + 7) % 48] + acc[(k + 13) % 48];
  }
  double s = 0;
#pragma unroll
  for (int k = 0; k < 48; ++k) s += acc[k];
  out[threadIdx.x] = s;
}

struct Big { char d[1024]; };
extern "C" __global__ void big_param(Big b, char* out) { out[threadIdx.x] = b.d[threadIdx.x]; }

extern "C" __global__ void __launch_bounds__(256) bounded(float* o) { o[threadIdx.x] = 1.f; }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // clusters need sm_90
extern "C" __global__ void __cluster_dims__(2, 1, 1) clustered(float* o) { o[threadIdx.x] = 2.f; }
#endif
extern "C" __global__ void no_params() {}
"""

ENTRY_NAMES = {
    "plain_add", "with_shared", "_Z4fillIiEvPT_S0_", "_Z4fillIdEvPT_S0_", "many_regs", "big_param", "bounded",
    "clustered", "no_params",
}
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def _find_tools(name: str) -> list[str]:
    """Every cuobjdump/ptxas on PATH, in the CUDA toolkit, or bundled with Triton."""
    hits = [shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    try:
        import triton  # only its bundled binaries are used

        hits.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    except Exception:
        pass
    return list(dict.fromkeys(h for h in hits if h and os.path.exists(h)))


def _find_tool(name: str) -> str | None:
    tools = _find_tools(name)
    return tools[0] if tools else None


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, bytes]:
    """{variant: bytes}: sm_90 cubin, sm_80+sm_90(+PTX) fatbin, LZ4- and zstd-compressed fatbins, PTX."""
    if NVCC is None:
        pytest.skip("nvcc not found: cubin tests need the CUDA toolkit to build test images")
    d = tmp_path_factory.mktemp("cubin")
    src = d / "kernels.cu"
    src.write_text(KERNELS_CU)
    variants = {
        "cubin": ["-cubin", "-arch=sm_90"],
        "fatbin": ["-fatbin", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
                   "arch=compute_90,code=[sm_90,compute_90]"],
        "fatbin_lz4": ["-fatbin", "--compress-mode=speed", "-Xfatbin", "-compress-all", "-gencode",
                       "arch=compute_90,code=sm_90"],
        "fatbin_zstd": ["-fatbin", "--compress-mode=size", "-Xfatbin", "-compress-all", "-gencode",
                        "arch=compute_90,code=sm_90"],
        "ptx": ["-ptx", "-arch=sm_90"],
    }
    optional = {"fatbin_lz4", "fatbin_zstd"}  # --compress-mode needs nvcc >= 12.8
    out = {}
    for name, flags in variants.items():
        target = d / f"k.{name}"
        proc = subprocess.run([NVCC, *flags, "-o", str(target), str(src)], capture_output=True, text=True)
        if proc.returncode and name not in optional:
            pytest.fail(f"nvcc could not build the {name} variant:\n{proc.stderr[-2000:]}")
        out[name] = target.read_bytes() if not proc.returncode else None
    out["_dir"] = str(d).encode()
    return out


def _res_usage(path: str) -> dict[str, dict[str, int]]:
    tool = _find_tool("cuobjdump")
    if tool is None:
        return {}
    proc = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    if proc.returncode:
        return {}
    usage, name = {}, None
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        elif name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d\])?):(\d+)", line)}
            name = None
    return usage


# --- ELF cubins -------------------------------------------------------------------------------------------


def test_cubin_kernels_and_arch(built):
    info = cubin.parse_image(built["cubin"])
    assert info.kind == "elf" and info.arch == 90
    assert set(info.kernels) == ENTRY_NAMES  # C++-mangled and extern "C"; the __device__ helper is not an entry
    assert not any("helper" in n for n in info.kernels)


def test_cubin_resources_match_cuobjdump(built):
    path = Path(built["_dir"].decode()) / "k.cubin"
    usage = _res_usage(str(path))
    if not usage:
        pytest.skip("cuobjdump not available to cross-check resource usage")
    info = cubin.parse_image(built["cubin"])
    assert set(usage) == set(info.kernels)
    for name, k in info.kernels.items():
        assert k.registers == usage[name]["REG"], name
        assert k.shared_bytes == usage[name]["SHARED"], name
        assert k.const0_bytes == usage[name]["CONSTANT[0]"], name
        assert k.frame_bytes == usage[name]["STACK"], name


def test_cubin_known_values(built):
    k = cubin.parse_image(built["cubin"]).kernels
    assert k["many_regs"].registers > 64 > k["plain_add"].registers > 0
    assert k["with_shared"].shared_bytes in (4096, 4096 + 1024)  # 1 KiB may be the sm_90 system reservation
    assert k["plain_add"].shared_bytes in (0, 1024)
    assert k["big_param"].param_bytes == 1032  # 1024-byte struct + 8-byte pointer
    assert k["plain_add"].param_bytes == 20  # two pointers and an int
    assert k["no_params"].param_bytes == 0
    assert k["big_param"].const0_bytes == k["big_param"].param_offset + k["big_param"].param_bytes
    assert k["bounded"].max_threads == (256, 1, 1)
    assert k["clustered"].cluster_dims == (2, 1, 1)
    assert k["plain_add"].max_threads is None and k["plain_add"].cluster_dims is None


def test_older_abi_cubin(built, tmp_path):
    """ABI 7 (CUDA 12.x ptxas): arch in the low byte of e_flags; same kernels and registers."""
    old_ptxas = [p for p in _find_tools("ptxas")
                 if "cuda_12" in subprocess.run([p, "--version"], capture_output=True, text=True).stdout]
    if not old_ptxas:
        pytest.skip("no CUDA 12 ptxas here (Triton bundles one) to build an ABI 7 cubin")
    ptxas = old_ptxas[0]
    ptx = re.sub(rb"\.version \d+\.\d+", b".version 8.5", built["ptx"])
    (tmp_path / "k.ptx").write_bytes(ptx)
    proc = subprocess.run([ptxas, "-arch=sm_90", "-o", str(tmp_path / "old.cubin"), str(tmp_path / "k.ptx")],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"ptxas failed: {proc.stderr.strip()[:200]}")
    old = cubin.parse_image((tmp_path / "old.cubin").read_bytes())
    new = cubin.parse_image(built["cubin"])
    assert old.abi_version == 7 and new.abi_version == 8 and old.arch == 90
    assert set(old.kernels) == set(new.kernels)
    assert old.kernels["many_regs"].registers > 64


def test_register_count_in_sh_info(built):
    """Older toolchains keep the register count in the top byte of .text.<name>'s sh_info: honour it."""
    data = bytearray(built["cubin"])
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    names_off = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 24)[0]
    for i in range(shnum):
        hdr = shoff + i * shentsize
        name_off = struct.unpack_from("<I", data, hdr)[0]
        name = data[names_off + name_off: data.index(b"\0", names_off + name_off)]
        if name == b".text.plain_add":
            info = struct.unpack_from("<I", data, hdr + 44)[0]
            struct.pack_into("<I", data, hdr + 44, (77 << 24) | (info & 0xFFFFFF))
    assert cubin.parse_image(bytes(data)).kernels["plain_add"].registers == 77


# --- fatbins and PTX --------------------------------------------------------------------------------------


def test_fatbin_entries(built):
    entries = cubin.parse_fatbin_entries(built["fatbin"])
    kinds = sorted((e.kind, e.arch) for e in entries)
    assert kinds == [("elf", 80), ("elf", 90), ("ptx", 90)]
    info = cubin.parse_image(built["fatbin"])
    assert info.kind == "fatbin" and info.arch == 90
    assert {e.arch for e in info.elves} == {80, 90}
    assert set(info.kernels) == ENTRY_NAMES  # the newest ELF's kernels
    assert set(info.for_arch(80).kernels) == ENTRY_NAMES - {"clustered"}
    assert sorted(cubin.parse_image(e).arch for e in cubin.elf_entries(built["fatbin"])) == [80, 90]


def test_fatbin_arch_selection(built):
    info = cubin.parse_image(built["fatbin"])
    assert info.for_arch(90).arch == 90
    assert info.for_arch(86).arch == 80  # newest same-major arch not above the device
    assert info.for_arch(75) is None
    sm90 = cubin.parse_image(built["cubin"])
    assert sm90.for_arch(90) is sm90 and sm90.for_arch(100) is None


def _compressed(built, name: str, codec: str) -> bytes:
    data = built[name]
    if data is None:
        pytest.skip(f"this nvcc cannot build compressed fatbins ({name})")
    codecs = [e.compression for e in cubin.parse_fatbin_entries(data)]
    if codecs != [codec]:
        pytest.skip(f"this nvcc compressed the {name} variant as {codecs}, not {codec}")
    return data


def test_fatbin_lz4_entry_is_decompressed(built):
    _compressed(built, "fatbin_lz4", "lz4")
    info = cubin.parse_image(built["fatbin_lz4"])
    assert info.complete and info.kernels == cubin.parse_image(built["cubin"]).kernels


def test_fatbin_zstd_entry_is_reported_not_crashed(built):
    _compressed(built, "fatbin_zstd", "zstd")
    entries = cubin.parse_fatbin_entries(built["fatbin_zstd"])
    info = cubin.parse_image(built["fatbin_zstd"])
    if cubin._zstd_module() is None:
        assert not info.complete and entries[0].data is None
        assert any("zstd" in n for n in info.notes)
        assert info.for_arch(90) is None and cubin.elf_entries(built["fatbin_zstd"]) == []
    else:
        assert info.complete and set(info.kernels) == ENTRY_NAMES


def test_ptx_entries(built):
    info = cubin.parse_image(built["ptx"])
    assert info.kind == "ptx" and info.arch == 90 and set(info.kernels) == ENTRY_NAMES
    assert info.kernels["plain_add"].registers == -1  # unknown before JIT


def test_lz4_block_vectors():
    assert cubin.lz4_block_decompress(b"\x50hello", 5) == b"hello"
    # literals "ab", then a match of 6 at offset 2 (overlapping copy), then a literal-only tail "!"
    assert cubin.lz4_block_decompress(b"\x22ab\x02\x00\x10!", 9) == b"abababab!"
    # 15+ literals use length continuation bytes
    assert cubin.lz4_block_decompress(b"\xf0\x05" + b"x" * 20, 20) == b"x" * 20
    for bad, size in [(b"\x22ab\x09\x00", 8), (b"\x22ab\x02", 8), (b"\x50hel", 5), (b"\x50hello", 6),
                      (b"\x22ab\x02\x00", 4)]:
        with pytest.raises(ValueError):
            cubin.lz4_block_decompress(bad, size)


# --- garbage ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blob", [b"", b"\x7fEL", b"\x7fELF", b"\x7fELF" + b"\0" * 60, b"hello world" * 10,
                                  struct.pack("<IHHQ", cubin.FATBIN_MAGIC, 1, 16, 10_000),
                                  struct.pack("<I", cubin.FATBIN_WRAPPER_MAGIC) + b"\0" * 20])
def test_garbage_raises_value_error(blob):
    with pytest.raises(ValueError):
        cubin.parse_image(blob)


def test_truncations_raise_value_error(built):
    for name in ("cubin", "fatbin", "fatbin_lz4"):
        data = built[name]
        if data is None:
            continue
        cuts = sorted({*range(0, 200, 7), *range(0, len(data), max(1, len(data) // 60)), len(data) - 1})
        parsed = []
        for cut in cuts:
            try:
                cubin.parse_image(data[:cut])
            except ValueError:
                continue  # expected; anything else escapes and fails the test
            parsed.append(cut)
        if name == "cubin":   # the program header table's gap has its own (xfail) test below
            parsed = [cut for cut in parsed if cut < _phoff(data)]
        assert not parsed, f"{name}: truncated to {parsed[:5]} of {len(data)} bytes and still parsed"


def _phoff(elf: bytes) -> int:
    return struct.unpack_from("<Q", elf, 0x20)[0]


def test_truncated_program_header_table_is_detected(built):
    data = built["cubin"]
    assert _phoff(data) < len(data)
    with pytest.raises(ValueError):
        cubin.parse_image(data[:-1])


def test_corrupted_headers(built):
    data = built["cubin"]

    def patched(offset, fmt, value):
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    for blob in (patched(0x28, "<Q", 1 << 40),  # e_shoff far away
                 patched(0x3C, "<H", 0xFFFF),  # e_shnum
                 patched(0x3E, "<H", 0xFFF0),  # e_shstrndx
                 patched(0x3A, "<H", 8),  # e_shentsize too small
                 patched(0x12, "<H", 62)):  # x86-64, not EM_CUDA
        with pytest.raises(ValueError):
            cubin.parse_image(blob)


def _parsed_or_refused(blob: bytes) -> str:
    """Parse ``blob``: either a one-line ValueError ("refused") or an ImageInfo whose every part is what its type
    promises, and which answers what images.py asks of it ("parsed")."""
    try:
        info = cubin.parse_image(blob)
    except ValueError as err:
        assert str(err) and "\n" not in str(err), repr(err)
        return "refused"
    assert info.kind in ("elf", "fatbin", "ptx") and isinstance(info.arch, int)
    for image in (info, *info.elves):
        assert all(isinstance(name, str) and kernel.name == name for name, kernel in image.kernels.items())
        assert isinstance(image.kernel_names, frozenset)
    assert all(e.kind == "elf" for e in info.elves)
    assert all(isinstance(note, str) and "\n" not in note for note in info.notes)
    for arch in (80, 90, 100):
        chosen = info.for_arch(arch)
        assert chosen is None or isinstance(chosen, cubin.ImageInfo)
    return "parsed"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_mutations_only_raise_value_error(built, data):
    """Flip bytes anywhere in real images: the parser either gives a well-formed result or raises a one-line
    ValueError."""
    name = data.draw(st.sampled_from(["cubin", "fatbin", "fatbin_lz4"]))
    blob = bytearray(built[name] or built["cubin"])
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    assert _parsed_or_refused(bytes(blob)) in ("parsed", "refused")


def test_a_fatbin_whose_ptx_entry_is_unreadable_has_nothing_to_load():
    """Found by the mutation test: a PTX entry damaged so that it is no PTX text made for_arch raise."""
    fat = cubin.ImageInfo(kind="fatbin", arch=0, kernels={},
                          entries=(cubin.FatbinEntry(kind="ptx", arch=90, compression="", size=8, data=b"garbage!"),))
    assert fat.for_arch(90) is None


def test_the_mutation_check_sees_both_outcomes(built):
    """_parsed_or_refused is exercised on each side: an intact image parses, a broken header is refused."""
    assert _parsed_or_refused(built["cubin"]) == "parsed"
    assert _parsed_or_refused(b"\x7fELF" + bytes(60)) == "refused"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_value_error(blob):
    for prefix in (b"", b"\x7fELF\x02\x01\x01A\x08", struct.pack("<IHHQ", cubin.FATBIN_MAGIC, 1, 16, len(blob))):
        assert _parsed_or_refused(prefix + blob) in ("parsed", "refused")


# --- module-scope variables (__device__ / __constant__) ------------------------------------------------------

GLOBALS_CU = r"""
__device__ int counter;
__device__ float table[4] = {1.f, 2.f, 3.f, 4.f};
__constant__ float coef[8];
__constant__ int cinit[2] = {7, 9};
extern "C" __global__ void uses_globals(float* out) {
  __shared__ float s[32];
  int i = threadIdx.x;
  s[i] = table[i & 3] * coef[i & 7] + cinit[i & 1];
  __syncthreads();
  out[i] = s[31 - i] + atomicAdd(&counter, 1);
}
"""

#: a module with no kernels, only data: what cuBLAS 13 ships for its alpha/beta constants (the address can only
#: reach a kernel as an argument)
ONLY_DATA_CU = r"""
namespace lib { namespace internal { __device__ double deviceConstants[2] = {1.0, 0.0}; } }
"""


@pytest.fixture(scope="module")
def globals_built(tmp_path_factory) -> dict[str, bytes]:
    if NVCC is None:
        pytest.skip("nvcc not found: cubin tests need the CUDA toolkit to build test images")
    d = tmp_path_factory.mktemp("globals")
    out = {}
    for name, src, flags in (("globals", GLOBALS_CU, ["-cubin", "-arch=sm_90"]),
                             ("globals_fatbin", GLOBALS_CU, ["-fatbin", "-gencode", "arch=compute_80,code=sm_80",
                                                             "-gencode", "arch=compute_90,code=sm_90"]),
                             ("only_data", ONLY_DATA_CU, ["-cubin", "-arch=sm_90"]),
                             ("no_globals", KERNELS_CU, ["-cubin", "-arch=sm_90"])):
        (d / f"{name}.cu").write_text(src)
        target = d / f"{name}.bin"
        proc = subprocess.run([NVCC, *flags, "-o", str(target), str(d / f"{name}.cu")], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.fail(f"nvcc could not build {name}:\n{proc.stderr[-2000:]}")
        out[name] = target.read_bytes()
    return out


def test_module_variables_with_sections_and_initial_bytes(globals_built):
    info = cubin.parse_image(globals_built["globals"])
    g = info.globals
    assert set(g) == {"counter", "table", "coef", "cinit"}
    assert (g["counter"].section, g["counter"].size, g["counter"].initial) == (".nv.global", 4, bytes(4))
    assert g["table"].section == ".nv.global.init"
    assert g["table"].initial == struct.pack("<4f", 1, 2, 3, 4)
    assert g["coef"].section.startswith(".nv.constant") and g["coef"].initial == bytes(32)
    assert g["cinit"].initial == struct.pack("<2i", 7, 9) and g["cinit"].section == g["coef"].section
    assert {v.kind for v in g.values()} == {"device", "constant"}
    assert g["counter"].kind == "device" and g["coef"].kind == "constant"
    assert set(info.kernels) == {"uses_globals"}  # kernels are unchanged by the new table


def test_kernel_less_module_keeps_its_variable(globals_built):
    info = cubin.parse_image(globals_built["only_data"])
    assert info.kernels == {}
    (name, var), = info.globals.items()
    assert "deviceConstants" in name and var.size == 16 and var.initial == struct.pack("<2d", 1.0, 0.0)


def test_fatbin_globals_are_those_of_the_chosen_elf(globals_built):
    info = cubin.parse_image(globals_built["globals_fatbin"])
    assert set(info.globals) == {"counter", "table", "coef", "cinit"}
    assert info.for_arch(90).globals["table"].initial == struct.pack("<4f", 1, 2, 3, 4)
    assert info.for_arch(80).arch == 80 and set(info.for_arch(80).globals) == set(info.globals)


def test_images_without_module_variables(globals_built):
    """Per-kernel sections (parameters in .nv.constant0.<k>, shared memory) are not module variables."""
    assert cubin.parse_image(globals_built["no_globals"]).globals == {}
    assert cubin.is_module_data_section(".nv.constant3") and cubin.is_module_data_section(".nv.global.init")
    assert not cubin.is_module_data_section(".nv.constant0.plain_add")
    assert not cubin.is_module_data_section(".nv.shared.with_shared")


def test_variable_outside_its_section_is_malformed(globals_built):
    data = bytearray(globals_built["globals"])
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        typ, = struct.unpack_from("<I", data, shoff + i * shentsize + 4)
        if typ == cubin.SHT_SYMTAB:
            off, size = struct.unpack_from("<QQ", data, shoff + i * shentsize + 24)  # sh_offset, sh_size
            break
    for k in range(size // 24):
        at = off + 24 * k
        if data[at + 4] & 0xF == cubin.STT_OBJECT and struct.unpack_from("<Q", data, at + 16)[0] == 16:  # table
            struct.pack_into("<Q", data, at + 8, 1 << 20)  # st_value far beyond .nv.global.init
            break
    with pytest.raises(ValueError, match="outside"):
        cubin.parse_image(bytes(data))


RELOC_CU = r"""
__device__ int x;
__device__ int* px = &x;
__device__ int both[4] = {1, 2, 3, 4};
extern "C" __global__ void store(int v) { *px = v + both[v & 3]; }
"""


def test_relocated_words_of_a_variable_are_known(tmp_path):
    """``int* px = &x`` is patched by the driver at load: its live bytes are an address, not the image's zeros."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    (tmp_path / "r.cu").write_text(RELOC_CU)
    subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-o", str(tmp_path / "r.cubin"), str(tmp_path / "r.cu")],
                   check=True, capture_output=True)
    g = cubin.parse_image((tmp_path / "r.cubin").read_bytes()).globals
    assert g["px"].relocated == (0,) and g["both"].relocated == () and g["x"].relocated == ()
    assert g["px"].same_as_loaded((0x7F0012345678).to_bytes(8, "little"))  # whatever address the driver put
    assert not g["both"].same_as_loaded(struct.pack("<4i", 1, 2, 3, 5))
    assert g["both"].same_as_loaded(struct.pack("<4i", 1, 2, 3, 4)) and not g["both"].same_as_loaded(b"\0")
