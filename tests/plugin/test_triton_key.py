"""Triton's cache key computed on a thread while SGLang loads its model (foundry_sglang.plugin.triton_key), with
the real Triton; where the graph phase waits for it: tests/plugin/test_plugin_hooks.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from foundry_sglang.plugin.triton_key import TritonKeyWarmup, triton_key_function


def test_the_thread_computes_tritons_own_key_and_the_first_launch_finds_it_cached():
    """In a fresh interpreter (Triton's cache is per process): after the warm-up, Triton's cached function has
    its key (computed once, on the warm-up's thread) and a later call on the main thread is a cache hit."""
    code = """
import json
from foundry_sglang.plugin.triton_key import TritonKeyWarmup, triton_key_function
key = triton_key_function()
before = key.cache_info().currsize
warm = TritonKeyWarmup.start(key)
warm.wait(60)
after = key.cache_info()
main = key()
print(json.dumps({"before": before, "after": after.currsize, "misses": after.misses, "hits": key.cache_info().hits,
                  "equal": main == key.__wrapped__(), "thread_seconds": warm.seconds, "ran_on": warm.ran_on}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] == 0 and r["after"] == 1 and r["misses"] == 1 and r["hits"] == 1
    assert r["equal"] and r["thread_seconds"] is not None and r["ran_on"] == "foundry-triton-key"


def test_a_key_already_cached_starts_no_thread():
    key = triton_key_function()
    key()
    warm = TritonKeyWarmup.start(key)
    assert warm.already_cached and warm.ran_on is None and warm.wait(0) < 1.0


def test_a_failing_key_is_logged_and_leaves_triton_to_compute_it(caplog):
    class Broken:
        def cache_info(self):
            return type("Info", (), {"currsize": 0})()

        def __call__(self):
            raise OSError("libtriton.so: no such file")

    warm = TritonKeyWarmup.start(Broken())
    with caplog.at_level("INFO", logger="foundry_sglang.plugin.triton_key"):
        warm.wait(10)
    assert "could not be computed early (OSError: libtriton.so: no such file)" in caplog.text
