"""The documented public API resolves, and the version has one source."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_every_name_in_foundry_core_all_resolves():
    import foundry_core

    for name in foundry_core.__all__:
        assert getattr(foundry_core, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = foundry_core.no_such_name


def test_restored_graph_is_importable_from_the_package():
    # The README documents `foundry_core.RestoredGraph`; it lives in foundry_core.restore.
    r = subprocess.run([sys.executable, "-c", "from foundry_core import RestoredGraph, Session; "
                        "print(RestoredGraph.__module__, Session.__module__)"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["foundry_core.restore", "foundry_core.session"]


@pytest.mark.parametrize("module", ["foundry_core.errors", "foundry_core.session", "foundry_core.restore",
                                    "foundry_core.recorder", "foundry_core.images", "foundry_core.binaries",
                                    "foundry_core.archive", "foundry_core.options"])
def test_public_modules_declare_all(module):
    mod = importlib.import_module(module)
    assert mod.__all__ and all(hasattr(mod, n) for n in mod.__all__)


def test_version_is_defined_once():
    import foundry_core
    import foundry_sglang

    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r'^version = "', pyproject, re.M)
    assert 'attr = "foundry_core.__version__"' in pyproject
    assert foundry_sglang.__version__ == foundry_core.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", foundry_core.__version__)


def test_binaries_reexports_the_recorder_and_images_modules():
    from foundry_core import binaries, images, recorder

    assert set(binaries.__all__) == set(recorder.__all__) | set(images.__all__)
    for name in binaries.__all__:
        home = recorder if name in recorder.__all__ else images
        assert getattr(binaries, name) is getattr(home, name)
