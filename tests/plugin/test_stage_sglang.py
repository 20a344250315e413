"""scripts/stage_sglang.py on synthetic wheels: kernel-wheel trimming, parts with sha256, install with entry point."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("stage_sglang", ROOT / "scripts" / "stage_sglang.py")
stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage)


def make_wheel(path: Path, files: dict[str, bytes], dist: str) -> Path:
    """A wheel with ``files`` plus METADATA/WHEEL and a RECORD listing them."""
    info = f"{dist}.dist-info"
    files = dict(files)
    name, version = dist.rsplit("-", 1)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    rows = [(n, "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode(), str(len(d)))
            for n, d in files.items()] + [(f"{info}/RECORD", "", "")]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    files[f"{info}/RECORD"] = text.getvalue().encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    return path


def test_trimmed_kernel_wheel_keeps_the_hopper_library_and_a_true_record(tmp_path):
    src = make_wheel(tmp_path / "sglang_kernel-0.4.5-cp310-abi3-manylinux2014_x86_64.whl", {
        "sgl_kernel/__init__.py": b"x = 1\n", "sgl_kernel/sm90/common_ops.abi3.so": b"H" * 1000,
        "sgl_kernel/sm100/common_ops.abi3.so": b"B" * 1000, "sgl_kernel/flash_ops.abi3.so": b"F" * 5000,
        "sgl_kernel/flashmla_ops.abi3.so": b"M" * 10, "sgl_kernel/infllm_ops.cpython-310-x86_64-linux-gnu.so": b"I",
        "sgl_kernel/infllm_v2/__init__.py": b"", "triton_kernels/a.py": b"y = 2\n"}, "sglang_kernel-0.4.5")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    trimmed = stage.trim_kernel_wheel(src, out_dir)
    with zipfile.ZipFile(trimmed) as z:
        names = set(z.namelist())
        record = list(csv.reader(io.StringIO(z.read("sglang_kernel-0.4.5.dist-info/RECORD").decode())))
        contents = {n: z.read(n) for n in names}
    assert "sgl_kernel/sm90/common_ops.abi3.so" in names and "sgl_kernel/infllm_v2/__init__.py" in names
    assert not any(n.startswith(stage.KERNEL_DROP) for n in names)
    listed = {row[0]: row for row in record}
    assert set(listed) == names  # every file listed, nothing dropped still listed
    for name, (_, digest, size) in listed.items():
        if name.endswith("RECORD"):
            continue
        data = contents[name]
        assert size == str(len(data))
        assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _bundle(tmp_path) -> tuple[Path, dict]:
    bundle = tmp_path / "stage" / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    make_wheel(bundle / "wheels" / "tinypkg-1.0-py3-none-any.whl",
               {"tinypkg/__init__.py": b"VALUE = 42\n" + b"#" * 20000}, "tinypkg-1.0")
    (bundle / "tvm-ffi-cache" / "sgl_kernel_jit_x__arch_9.0a").mkdir(parents=True)
    (bundle / "tvm-ffi-cache" / "sgl_kernel_jit_x__arch_9.0a" / "x.so").write_bytes(b"\x7fELF" + b"0" * 100)
    manifest = stage.pack_parts(bundle, tmp_path / "stage" / "parts", part_bytes=4096)
    return tmp_path / "stage" / "parts", manifest


def test_parts_append_and_install_with_an_entry_point(tmp_path):
    parts, manifest = _bundle(tmp_path)
    assert len(manifest["parts"]) > 1 and all(p["size"] <= 4096 for p in manifest["parts"])
    dest = tmp_path / "device-tmp"
    for p in manifest["parts"]:
        assert stage.cmd_append(Namespace(part=str(parts / p["name"]), manifest=None, dest=str(dest))) == 0
    args = Namespace(dest=str(dest), target=None, project=str(ROOT), check=False)
    assert stage.cmd_install(args) == 0
    site = dest / "site"
    assert "VALUE = 42" in (site / "tinypkg" / "__init__.py").read_text()
    eps = [ep for d in importlib.metadata.distributions(path=[str(site)])
           for ep in d.entry_points if ep.group == "sglang.srt.plugins"]
    assert [(ep.name, ep.value) for ep in eps] == [("foundry", "foundry_sglang.plugin:register")]
    env = (dest / "env.sh").read_text()
    assert f"PYTHONPATH={site}:{ROOT}" in env and "SGLANG_IS_FLASHINFER_AVAILABLE=false" in env
    assert (dest / "bundle" / "tvm-ffi-cache" / "sgl_kernel_jit_x__arch_9.0a" / "x.so").exists()
    assert stage.cmd_install(args) == 0  # idempotent: the stamp matches, nothing reinstalled


def test_a_broken_part_is_rejected_and_a_missing_one_named(tmp_path):
    parts, manifest = _bundle(tmp_path)
    dest = tmp_path / "device-tmp"
    first = parts / manifest["parts"][0]["name"]
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(stage.StageError, match="sha256"):
        stage.cmd_append(Namespace(part=str(first), manifest=None, dest=str(dest)))
    assert not (dest / "parts" / first.name).exists()
    second = parts / manifest["parts"][1]["name"]
    stage.cmd_append(Namespace(part=str(second), manifest=None, dest=str(dest)))
    with pytest.raises(stage.StageError, match="missing part-1"):
        stage.cmd_install(Namespace(dest=str(dest), target=None, project=str(ROOT), check=False))


def test_manifest_lists_wheels_and_jit_modules(tmp_path):
    _, manifest = _bundle(tmp_path)
    assert manifest["wheels"] == ["tinypkg-1.0-py3-none-any.whl"]
    assert manifest["jit_modules"] == ["sgl_kernel_jit_x__arch_9.0a"]
    assert json.loads((tmp_path / "stage" / "parts" / "manifest.json").read_text())["bundle_sha256"] == \
        manifest["bundle_sha256"]
