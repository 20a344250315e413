"""foundry_core's internal boundaries, checked on its source: SAVE and LOAD take explicit inputs, not Session
internals; every ctypes declaration and the one cuda.bindings call wrapper live in native.py; mode names are
defined once (SessionMode)."""
from __future__ import annotations

import re
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "foundry_core"


def offenders(pattern: str, *skip: str) -> list[str]:
    rx = re.compile(pattern)
    return [f"{p.name}:{n}: {line.strip()}" for p in sorted(CORE.glob("*.py")) if p.name not in skip
            for n, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]


def test_save_and_restore_read_no_session_internals():
    assert offenders(r"\bsession\._\w+", "session.py") == []
    assert offenders(r"def write_archive\(inputs: SaveInputs") != []
    assert offenders(r"def restore_archive\(inputs: RestoreInputs") != []


def test_ctypes_declarations_and_driver_call_wrappers_live_in_native():
    assert offenders(r"\.(argtypes|restype)\s*=|\bCDLL\(", "native.py") == []
    assert offenders(r"^def _?(check|call)\((result|what)\b", "native.py") == []


def test_mode_names_are_defined_once():
    assert offenders(r"""["'](save|load|auto)["']\s*[,)\]]|mode\w*\s*(==|!=|in)\s*[(\[]?["'](save|load|auto)""",
                     "session.py") == []


def test_settings_are_read_from_the_environment_in_options_only():
    """Every FOUNDRY_* variable is named (as a string) and read in options.py alone; elsewhere the environment is
    read only for other tools' variables (the C compiler, the CUDA toolkit) and written only for CUDA's module
    loading. Before: nine modules read FOUNDRY_* variables themselves."""
    import ast

    named, environ = [], []
    for p in sorted(CORE.glob("*.py")):
        if p.name == "options.py":
            continue
        tree = ast.parse(p.read_text())
        named += [f"{p.name}:{n.lineno}: {n.value}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str) and re.fullmatch(r"FOUNDRY_[A-Z_]+", n.value)]
        environ += [f"{p.name}:{n}: {line.strip()}" for n, line in enumerate(p.read_text().splitlines(), 1)
                    if re.search(r"os\.environ|os\.getenv|\bgetenv\(", line)
                    and not re.search(r"\"(CC|CUDA_HOME|CUDA_PATH|CUDA_MODULE_LOADING)\"", line)]
    assert named == [] and environ == []
