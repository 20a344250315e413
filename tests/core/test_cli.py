"""`python -m foundry_core`: output, exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from foundry_core import schema
from foundry_core.archive import Archive
from foundry_core.cli import main
from foundry_core.fingerprint import gpu_unavailable_reason

REPO = Path(__file__).resolve().parents[2]
NO_GPU = gpu_unavailable_reason() is not None


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "foundry_core", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def corrupt_blob(path: Path, name: str) -> None:
    with Archive.open(path) as archive:
        offset = archive.manifest.blobs[name].offset
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def test_inspect_text(archive_file, capsys):
    path, _ = archive_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"schema      {schema.SCHEMA_VERSION}, created 2026-11-28T12:00:00Z" in out
    assert "gpu_name='NVIDIA H200'" in out and "key         'qwen3-8b|tp1|rank0|kv_pages=4096'" in out
    assert "base 0x6a0000000000, reserved 80.0 GiB" in out
    assert "capture range [0x6a0440000000, 0x6a0440600000) = 6.0 MiB" in out
    for category in ("images", "graph nodes", "graph payload", "graph attrs", "templates", "snapshots"):
        assert f"\n  {category} " in out, category
    assert "graphs (3)" in out and "decode_bs4" in out and "images (2)" in out
    graph_row = next(line for line in out.splitlines() if "decode_bs2" in line).split()
    assert graph_row == ["decode_bs2", "12", "11", "0", "1"]  # key, nodes, kernel nodes, template, outputs
    assert "extra       kv_pages='4096'" in out


def test_inspect_json(archive_file, capsys):
    path, blobs = archive_file
    assert main(["inspect", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    summary = doc["summary"]
    assert [g["key"] for g in summary["graphs"]] == ["decode_bs1", "decode_bs2", "decode_bs4"]
    assert summary["blobs"]["names"] == len(blobs)
    assert summary["blobs"]["by_category"]["graph attrs"]["count"] == 1  # three names, one stored record
    assert doc["manifest"]["functions"][0]["attributes"] == {"8": 232448}


def test_verify_ok(archive_file, capsys):
    path, _ = archive_file
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {path}: header, manifest and ")
    if NO_GPU:
        assert "machine check skipped: no CUDA GPU usable here" in out
    assert main(["verify", "--no-machine-check", str(path)]) == 0
    assert "skipped (--no-machine-check)" in capsys.readouterr().out


def test_verify_key(archive_file, capsys):
    path, _ = archive_file
    assert main(["verify", "--no-machine-check", "--key", "qwen3-8b|tp1|rank0|kv_pages=4096", str(path)]) == 0
    assert main(["verify", "--no-machine-check", "--key", "qwen3-8b|tp2|rank0|kv_pages=4096", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "saved for key='qwen3-8b|tp1|rank0|kv_pages=4096'; this machine has key='qwen3-8b|tp2|" in err


def test_verify_detects_corrupt_blob(archive_file, capsys):
    path, _ = archive_file
    corrupt_blob(path, "graphs/decode_bs1/nodes")
    assert main(["inspect", str(path)]) == 0  # inspect reads only the manifest
    capsys.readouterr()
    assert main(["verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {path}: blob 'graphs/decode_bs1/nodes' sha256 mismatch (corrupt)\n"


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_bad_files_exit_1(tmp_path, archive_file, command, capsys):
    path, _ = archive_file
    truncated = tmp_path / "truncated.foundry"
    truncated.write_bytes(path.read_bytes()[:-50])
    not_archive = tmp_path / "notes.txt"
    not_archive.write_text("hello world, this is not an archive at all; it is long enough for a header....")
    for target, message in [
        (tmp_path / "missing.foundry", "cannot open"),
        (tmp_path, "is a directory"),
        (truncated, "truncated: manifest at"),
        (not_archive, "bad magic"),
    ]:
        assert main([command, str(target)]) == 1, target
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["inspect"], ["verify", "a", "b"], ["inspect", "--bogus", "x"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
    capsys.readouterr()


def test_help_explains_every_flag(capsys):
    for argv, flags in [
        (["--help"], ["--verbose", "inspect", "verify", "machine", "Exit codes"]),
        (["inspect", "--help"], ["ARCHIVE", "--json"]),
        (["verify", "--help"], ["ARCHIVE", "--key", "--no-machine-check", "--device"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for flag in flags:
            assert flag in out, (argv, flag)


def test_subprocess_exit_codes_and_no_tracebacks(archive_file, tmp_path):
    path, _ = archive_file
    ok = run("verify", str(path))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert run("inspect", str(path)).returncode == 0

    corrupt_blob(path, "snapshots/0")
    bad = run("-v", "verify", str(path))
    assert bad.returncode == 1
    assert "sha256 mismatch" in bad.stderr and "Traceback" not in bad.stderr

    garbage = tmp_path / "garbage.foundry"
    garbage.write_bytes(b"FNDRYARC" + bytes(100))
    result = run("inspect", str(garbage))
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1

    usage = run("inspect")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr

    machine = run("machine")
    assert machine.returncode == 0 and "Traceback" not in machine.stderr
    if NO_GPU:
        assert machine.stdout.startswith("no CUDA GPU usable here")


# -- verify and sign pass only what LOAD accepts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    from fuzz_archives import write_realistic_archive

    path = tmp_path_factory.mktemp("cli") / "valid.foundry"
    write_realistic_archive(path)
    return path


def _bad_kernel_ref(doc, blobs):
    rec = doc["graphs"][1]
    nodes = np.frombuffer(blobs[rec["nodes"]], schema.NODE_DTYPE).copy()
    nodes["ref"][nodes["kind"] == schema.NODE_KERNEL] = 99
    blobs[rec["nodes"]] = nodes.tobytes()


def _rank_patch_outside_the_payload(doc, blobs):
    doc["ranks"]["deltas"][0]["patches"][0]["offset"] = 10**6  # only LOAD as rank 1 applies it


@pytest.mark.parametrize("edit, message", [(_bad_kernel_ref, "refers to kernel 99 of 3"),
                                           (_rank_patch_outside_the_payload, "patch at 1000000+1 lies outside")])
def test_verify_and_sign_refuse_tables_that_load_refuses(realistic, tmp_path, monkeypatch, capsys, edit, message):
    """Before: both checked sha256s and trust only, and passed archives whose tables LOAD refuses."""
    from fuzz_archives import tamper

    assert main(["verify", str(realistic), "--no-machine-check"]) == 0
    assert "pass LOAD's checks for each of its 2 ranks" in capsys.readouterr().out
    bad = tamper(realistic, tmp_path / "bad.foundry", edit=edit)
    assert main(["verify", str(bad), "--no-machine-check"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    monkeypatch.setenv("FOUNDRY_ARCHIVE_KEY", "a deployment secret of enough length")
    assert main(["sign", str(bad)]) == 1
    assert message in capsys.readouterr().err
    assert not bad.with_name(bad.name + ".hmac").exists()
