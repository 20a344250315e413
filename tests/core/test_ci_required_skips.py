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
