"""The GPU scripts on a machine without a CUDA GPU: one line, exit status 2, no traceback; and each script
explains its flags (``--help``) anywhere. The GPU tests themselves skip there (tests/gpu/conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

#: Every script that needs a GPU, with a tiny argument set ("{tmp}": a temporary folder).
NEEDS_GPU = {
    "bench/cold_start.py": ["--models", "dense", "--dense-layers", "1", "--out", "{tmp}"],
    "bench/start.py": ["--starts", "1", "--out", "{tmp}", "--work", "{tmp}"],
    "bench/moe_decode.py": ["--layers", "1", "--out", "{tmp}"],
    "bench/elastic_standby_switch.py": ["--device", "cuda", "--log-dir", "{tmp}"],
    "tools/probe_pdl_gemm.py": [],
    "tests/gpu/check_comm_patch.py": ["--gpus", "1"],
    "tests/gpu/check_elastic.py": ["--out", "{tmp}", "--worker", "sglang", "--backend", "ray", "--share-gpu"],
    "tests/gpu/check_sglang_server.py": ["--out", "{tmp}", "--workdir", "{tmp}", "--no-fallback"],
    "tests/gpu/check_slots_live.py": ["--out", "{tmp}"],
}
CPU_SCRIPTS = {"bench/moe_depth_drift.py"}  # a CPU benchmark
WITH_FLAGS = sorted(set(NEEDS_GPU) - {"tools/probe_pdl_gemm.py"} | CPU_SCRIPTS)  # the probe takes none


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_bench_script_is_listed():
    bench = {f"bench/{p.name}" for p in (REPO / "bench").glob("*.py")}
    assert bench == {s for s in NEEDS_GPU if s.startswith("bench/")} | CPU_SCRIPTS
    gpu_scripts = {f"tests/gpu/{p.name}" for p in (REPO / "tests/gpu").glob("check_*.py")}
    assert gpu_scripts == {s for s in NEEDS_GPU if s.startswith("tests/gpu/")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit; this machine has a CUDA GPU")
@pytest.mark.parametrize("script", sorted(NEEDS_GPU))
def test_without_a_gpu_one_line_and_status_2(script, tmp_path):
    proc = run(script, *(a.replace("{tmp}", str(tmp_path)) for a in NEEDS_GPU[script]), cwd=tmp_path)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, output
    assert len(output.splitlines()) == 1 and output.startswith("no CUDA GPU: "), output
    assert "Traceback" not in output


@pytest.mark.parametrize("script", WITH_FLAGS)
def test_explains_its_flags(script, tmp_path):
    proc = run(script, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stdout + proc.stderr
