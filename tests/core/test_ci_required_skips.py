"""CI fails when a test skips for want of a required dependency (FOUNDRY_CI_REQUIRE), instead of passing."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def _run(tmp_path, require):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_needs_module.py").write_text(
        "import pytest\n"
        "pytest.importorskip('no_such_module_for_ci.sub')\n"
        "def test_a():\n    pass\n")
    (tmp_path / "test_needs_module_inside.py").write_text(
        "import pytest\n"
        "def test_b():\n    pytest.importorskip('no_such_module_for_ci')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("FOUNDRY_CI_REQUIRE", None)
    if require:
        env["FOUNDRY_CI_REQUIRE"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_required_module_skips_fail_the_run(tmp_path):
    proc = _run(tmp_path, "no_such_module_for_ci")
    assert proc.returncode != 0, proc.stdout
    assert proc.stdout.count("FOUNDRY_CI_REQUIRE requires no_such_module_for_ci") >= 2, proc.stdout


def test_without_the_requirement_they_skip(tmp_path):
    proc = _run(tmp_path, "")
    assert proc.returncode == 0 and "2 skipped" in proc.stdout, proc.stdout


def _run_without_a_compiler(tmp_path, require):
    """A test that needs the native toolchain, on a PATH without a C compiler."""
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_needs_cc.py").write_text(
        "import pytest\n"
        "from conftest import missing_tools\n"
        "pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))\n"
        "def test_c():\n    pass\n")
    (tmp_path / "bin").mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PATH=str(tmp_path / "bin"))
    env.pop("CC", None)
    env.pop("FOUNDRY_CI_REQUIRE", None)
    if require:
        env["FOUNDRY_CI_REQUIRE"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_required_tool_skip_fails_the_run(tmp_path):
    """Before: the native-trust and recorder tests skipped without cc or cuda.h, whatever CI required."""
    proc = _run_without_a_compiler(tmp_path, "ray,cc")
    assert proc.returncode != 0 and "FOUNDRY_CI_REQUIRE requires cc" in proc.stdout, proc.stdout


def test_a_tool_that_is_not_required_still_skips(tmp_path):
    for require in ("", "cuda_h"):
        proc = _run_without_a_compiler(tmp_path, require)
        assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout
