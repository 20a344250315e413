"""scripts/stage_sglang.py on synthetic wheels: kernel-wheel trimming, parts with sha256, install with entry point."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
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
    trimmed = stage.trim_wheel(src, out_dir, stage.KERNEL_DROP)
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
               {"tinypkg/__init__.py": b"VALUE = 42\n#" + base64.b64encode(os.urandom(15000))}, "tinypkg-1.0")
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
    args = Namespace(set="sglang", dest=str(dest), target=None, project=str(ROOT), check=False)
    assert stage.cmd_install(args) == 0
    site = dest / "site"
    assert "VALUE = 42" in (site / "tinypkg" / "__init__.py").read_text()
    eps = [ep for d in importlib.metadata.distributions(path=[str(site)])
           for ep in d.entry_points if ep.group == "sglang.srt.plugins"]
    assert [(ep.name, ep.value) for ep in eps] == [("foundry", "foundry_sglang.plugin:register")]
    env = (dest / "env.sh").read_text()
    assert f"PYTHONPATH={site}:{ROOT}" in env and "SGLANG_IS_FLASHINFER_AVAILABLE=false" in env
    sourced = subprocess.run(["bash", "-c", f". {dest / 'env.sh'}; echo $PYTHONPATH"], capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH="/other-set/site")).stdout.strip()
    assert sourced == f"{site}:{ROOT}:/other-set/site"      # another set's env.sh sourced before stays
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
        stage.cmd_install(Namespace(set="sglang", dest=str(dest), target=None, project=str(ROOT), check=False))


def test_manifest_lists_wheels_and_jit_modules(tmp_path):
    _, manifest = _bundle(tmp_path)
    assert manifest["wheels"] == ["tinypkg-1.0-py3-none-any.whl"]
    assert manifest["jit_modules"] == ["sgl_kernel_jit_x__arch_9.0a"]
    assert json.loads((tmp_path / "stage" / "parts" / "manifest.json").read_text())["bundle_sha256"] == \
        manifest["bundle_sha256"]


# -- wheel sets ------------------------------------------------------------------------------------------------
def _ray_set(tmp_path, monkeypatch) -> Path:
    """The ray wheel set with its device staging folder moved under tmp_path; returns its parts folder."""
    monkeypatch.setitem(stage.WHEEL_SETS, "ray", stage.WHEEL_SETS["ray"]._replace(dest=str(tmp_path / "foundry_ray")))
    bundle = tmp_path / "ray-stage" / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    make_wheel(bundle / "wheels" / "ray-2.60.0-py3-none-any.whl",
               {"ray/__init__.py": b"__version__ = '2.60.0'\n#" + base64.b64encode(os.urandom(22500))}, "ray-2.60.0")
    make_wheel(bundle / "wheels" / "msgspec-0.23.0-py3-none-any.whl", {"msgspec/__init__.py": b"M = 1\n"},
               "msgspec-0.23.0")
    manifest = stage.pack_parts(bundle, tmp_path / "ray-stage" / "parts", part_bytes=8192, wheel_set="ray")
    assert manifest["set"] == "ray" and len(manifest["parts"]) > 2
    return tmp_path / "ray-stage" / "parts"


def _append_all(parts: Path, dest=None) -> None:
    manifest = json.loads((parts / "manifest.json").read_text())
    for p in manifest["parts"]:
        assert stage.cmd_append(Namespace(part=str(parts / p["name"]), manifest=None, dest=dest)) == 0


def test_ray_set_parts_go_to_its_own_folder_and_install_without_sglang_extras(tmp_path, monkeypatch):
    parts = _ray_set(tmp_path, monkeypatch)
    manifest = json.loads((parts / "manifest.json").read_text())
    joined = b"".join((parts / p["name"]).read_bytes() for p in manifest["parts"])
    assert hashlib.sha256(joined).hexdigest() == manifest["bundle_sha256"] and len(joined) == manifest["bundle_size"]
    assert all(p["size"] <= 8192 for p in manifest["parts"])
    _append_all(parts)  # no --dest: the manifest's set decides where parts go
    dest = tmp_path / "foundry_ray"
    assert sorted(p.name for p in (dest / "parts").glob("part-*")) == sorted(p["name"] for p in manifest["parts"])
    assert stage.cmd_install(Namespace(set="ray", dest=None, target=None, project=str(ROOT), check=False)) == 0
    site = dest / "site"
    assert (site / "ray" / "__init__.py").read_text().startswith("__version__ = '2.60.0'")
    assert (site / "msgspec" / "__init__.py").exists()
    assert not list(site.glob("foundry*.dist-info"))  # the SGLang plugin entry point is sglang's business
    env = (dest / "env.sh").read_text()
    assert f"PYTHONPATH={site}:{ROOT}" in env and "RAY_USAGE_STATS_ENABLED=0" in env
    assert "TVM_FFI_CACHE_DIR" not in env and "SGLANG" not in env


def test_install_refuses_parts_of_another_set(tmp_path, monkeypatch):
    parts = _ray_set(tmp_path, monkeypatch)
    dest = tmp_path / "foundry_ray"
    _append_all(parts)
    with pytest.raises(stage.StageError, match="parts of set 'ray', not 'sglang'"):
        stage.cmd_install(Namespace(set="sglang", dest=str(dest), target=None, project=str(ROOT), check=False))
    assert not (dest / "site").exists()


def test_a_part_damaged_after_append_is_named_at_install(tmp_path, monkeypatch):
    parts = _ray_set(tmp_path, monkeypatch)
    _append_all(parts)
    staged = tmp_path / "foundry_ray" / "parts" / "part-2"
    data = bytearray(staged.read_bytes())
    data[-1] ^= 0x01
    staged.write_bytes(bytes(data))
    with pytest.raises(stage.StageError, match="part-2 .* does not match"):
        stage.cmd_install(Namespace(set="ray", dest=None, target=None, project=str(ROOT), check=False))


def test_parts_of_an_older_build_are_dropped_when_a_new_build_is_appended(tmp_path, monkeypatch):
    parts = _ray_set(tmp_path, monkeypatch)
    _append_all(parts)
    dest_parts = tmp_path / "foundry_ray" / "parts"
    n_old = len(list(dest_parts.glob("part-*")))
    bundle = tmp_path / "ray-stage" / "bundle"  # a rebuild with other contents: another bundle sha256
    make_wheel(bundle / "wheels" / "msgspec-0.23.0-py3-none-any.whl", {"msgspec/__init__.py": b"M = 2\n"},
               "msgspec-0.23.0")
    new = stage.pack_parts(bundle, parts, part_bytes=8192, wheel_set="ray")
    stage.cmd_append(Namespace(part=str(parts / "part-1"), manifest=None, dest=None))
    assert n_old > 1 and [p.name for p in dest_parts.glob("part-*")] == ["part-1"]
    with pytest.raises(stage.StageError, match="missing part-2"):
        stage.cmd_install(Namespace(set="ray", dest=None, target=None, project=str(ROOT), check=False))
    _append_all(parts)
    assert stage.cmd_install(Namespace(set="ray", dest=None, target=None, project=str(ROOT), check=False)) == 0
    assert json.loads((tmp_path / "foundry_ray" / "installed.json").read_text())["bundle_sha256"] == \
        new["bundle_sha256"]
    assert (tmp_path / "foundry_ray" / "site" / "msgspec" / "__init__.py").read_text() == "M = 2\n"


def test_build_takes_exactly_the_locked_versions(tmp_path):
    dl = tmp_path / "download"
    dl.mkdir()
    for dist in ("ray-2.59.0", "ray-2.60.0", "rpds_py-2026.9.1", "python_dotenv-1.2.4"):
        make_wheel(dl / f"{dist}-py3-none-any.whl", {}, dist)
    got = stage.locked_wheels(dl, ("ray==2.60.0", "rpds-py==2026.9.1", "python-dotenv==1.2.4"))
    assert [w.name.split("-")[:2] for w in got] == [["python_dotenv", "1.2.4"], ["ray", "2.60.0"],
                                                     ["rpds_py", "2026.9.1"]]
    with pytest.raises(stage.StageError, match="msgspec==0.23.0"):
        stage.locked_wheels(dl, ("ray==2.60.0", "msgspec==0.23.0"))
    with pytest.raises(stage.StageError, match="positive"):
        stage.pack_parts(tmp_path, tmp_path / "parts", part_bytes=0)


def test_ray_lock_pins_the_ray_the_elastic_code_is_tested_with():
    lock = stage.WHEEL_SETS["ray"].lock
    names = [spec.partition("==")[0] for spec in lock]
    assert all("==" in spec for spec in lock) and len(set(names)) == len(names)
    assert {"ray", "msgspec", "fastapi", "starlette", "pydantic", "uvicorn"} <= set(names)
    try:
        installed = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no ray on this machine")
    assert f"ray=={installed}" in lock


def test_wheels_travel_unpacked_in_xz_and_are_zipped_back_whole(tmp_path):
    # The bundle carries each wheel's files under xz (far smaller than the wheels' deflate); install zips them back.
    bundle = tmp_path / "stage" / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    text = b"def f():\n    return 1\n" * 4000
    whl = make_wheel(bundle / "wheels" / "srcpkg-1.0-py3-none-any.whl",
                     {"srcpkg/__init__.py": text, "srcpkg/bin/tool": b"#!/bin/sh\necho hi\n"}, "srcpkg-1.0")
    manifest = stage.pack_parts(bundle, tmp_path / "stage" / "parts", part_bytes=1 << 20)
    assert manifest["format"] == "tar.xz" and manifest["bundle_size"] < whl.stat().st_size
    dest = tmp_path / "device-tmp"
    _append_all(tmp_path / "stage" / "parts", str(dest))
    assert stage.cmd_install(Namespace(set="sglang", dest=str(dest), target=None, project=str(ROOT), check=False)) == 0
    with zipfile.ZipFile(whl) as a, zipfile.ZipFile(dest / "bundle" / "wheels" / whl.name) as b:
        assert a.namelist() == b.namelist() and all(a.read(n) == b.read(n) for n in a.namelist())
    assert (dest / "site" / "srcpkg" / "__init__.py").read_bytes() == text
