"""The native helper library is built into a private directory and loaded only when its hash is the one
recorded when foundry built it: a library planted in the cache never runs (CPU; needs cc and cuda.h)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from foundry_core import native
from foundry_core.errors import NativeBuildError

SOURCES = ["driver.c", "arena.c", "restore.c"]
pytestmark = pytest.mark.skipif(not (shutil.which("cc") and native.cuda_include_dirs()), reason="needs cc and cuda.h")

EVIL = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("FOUNDRY_TEST_MARKER"), "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int foundry_build_graph(void) { return 0; }
"""


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.getcwd(), **env))


def test_a_planted_library_never_runs(tmp_path):
    """Before: any file with the expected name in the cache was dlopen'ed, so its constructor ran."""
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    built = _python("""
        from foundry_core import native
        print(native.library_path("foundry_native", %r))
    """ % SOURCES, FOUNDRY_CACHE=str(cache))
    assert built.returncode == 0, built.stderr
    target = built.stdout.split()[-1]
    evil_c = tmp_path / "evil.c"
    evil_c.write_text(EVIL.replace("#include <stdio.h>", "#include <stdio.h>\n#include <stdlib.h>"))
    subprocess.run(["cc", "-shared", "-fPIC", str(evil_c), "-o", target], check=True)  # planted over the real one
    loaded = _python("""
        from foundry_core import native
        lib = native.load("foundry_native", %r)
        print(lib._foundry_path, hasattr(lib, "foundry_check_graph"))
    """ % SOURCES, FOUNDRY_CACHE=str(cache), FOUNDRY_TEST_MARKER=str(marker))
    assert loaded.returncode == 0, loaded.stderr
    assert not marker.exists(), "the planted library's constructor ran"
    assert loaded.stdout.split()[-1] == "True"  # the genuine library was rebuilt and loaded


def test_libraries_are_built_into_a_private_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path / "cache"))
    path = native.library_path("foundry_native_private", SOURCES)
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.parent.stat().st_uid == os.geteuid()
    assert path.stat().st_mode & 0o022 == 0


def test_a_cache_directory_writable_by_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path / "cache"))
    path = native.library_path("foundry_native_shared", SOURCES)
    path.parent.chmod(0o777)
    try:
        with pytest.raises(NativeBuildError, match="writable by other users"):
            native.library_path("foundry_native_shared", SOURCES)
    finally:
        path.parent.chmod(0o700)


def test_a_library_writable_by_others_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_CACHE", str(tmp_path / "cache"))
    path = native.library_path("foundry_native_mode", SOURCES)
    path.chmod(0o666)
    again = native.library_path("foundry_native_mode", SOURCES)
    assert again == path and path.stat().st_mode & 0o022 == 0
