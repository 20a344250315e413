"""The native helper library is built into a private directory and loaded only when its hash is the one
recorded when foundry built it: a library planted in the cache never runs (CPU; needs cc and cuda.h)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import missing_tools

from foundry_core import native
from foundry_core.errors import NativeBuildError

SOURCES = ["driver.c", "arena.c", "restore.c"]
MISSING = missing_tools()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

EVIL = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("FOUNDRY_TEST_MARKER"), "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int foundry_build_graph(void) { return 0; }
"""


def _python(code: str, cwd=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=os.getcwd(), **env))


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


def test_headers_planted_in_the_working_directory_are_never_compiled(tmp_path):
    """Before: the include directories came from sys.path, which holds the working directory ('' under -c, its
    absolute path under -m), so a planted ./nvidia/cu13/include/stdio.h was compiled into the helper library."""
    work = tmp_path / "work"
    for sub in ("nvidia/cu13/include", "include"):  # pip's layout, and CUDA_HOME=. below
        planted = work / sub
        planted.mkdir(parents=True)
        for header in ("cuda.h", "stdio.h"):
            (planted / header).write_text(f'#error "PLANTED {sub}/{header} was compiled"\n')
    built = _python("""
        import os, sys
        sys.path.insert(1, os.getcwd())  # as `python -m` puts it
        from foundry_core import native
        print(native.cuda_include_dirs())
        print(native.library_path("foundry_native", %r))
    """ % SOURCES, cwd=work, FOUNDRY_CACHE=str(tmp_path / "cache"), CUDA_HOME=".")
    assert built.returncode == 0, built.stderr[-2000:]
    assert "PLANTED" not in built.stdout + built.stderr
    assert str(work) not in built.stdout and "'include'" not in built.stdout.splitlines()[0]
