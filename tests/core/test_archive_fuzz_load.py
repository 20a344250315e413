"""A few hundred corrupted archives through everything LOAD checks on the CPU (the long run is
``python3 tools/fuzz_archives.py --cases 10000``): no crash, no hang, nothing but FoundryError."""
from __future__ import annotations

import os

import fuzz_archives


def test_corrupted_archives_are_accepted_or_refused_with_a_foundry_error():
    cases = int(os.environ.get("FOUNDRY_FUZZ_CASES", "200"))
    result = fuzz_archives.run(cases, seed0=0, timeout=60, jobs=1, verbose=False, progress=False)
    counts = result["counts"]
    assert result["defects"] == [], "\n".join(result["defects"][:5])
    assert counts["accepted"] + counts["refused"] == cases
    assert counts["refused"] > cases // 2  # the corruptions reach the checks instead of missing them


def test_the_harness_reports_crashes_hangs_other_exceptions_and_memory(monkeypatch):
    monkeypatch.setenv("FOUNDRY_FUZZ_SELFTEST", "1")
    result = fuzz_archives.run(4, seed0=0, timeout=5, jobs=1, verbose=False, progress=False)
    counts = result["counts"]
    assert (counts["crash"], counts["hang"], counts["exception"], counts["memory"]) == (1, 1, 1, 1)
    assert len(result["defects"]) == 4
