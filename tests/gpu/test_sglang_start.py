"""The SGLang start benchmark (bench/sglang_start.py, runnable by hand) on a real SGLang server: eager vs live
capture vs Foundry LOAD, one model and two interleaved rounds per test so that each fits 10 minutes (the bench's
``--merge`` joins records of several runs). Needs sglang staged (docs/STAGING.md)."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.sglang]


@pytest.mark.parametrize("model", ["qwen3-8b", "qwen3-30b-a3b"])
def test_sglang_start(model, run_script, out_dir, verdicts):
    run_script("../../bench/sglang_start.py", "--models", model, "--starts", "2", "--budget", "520", "--out",
               str(out_dir), record="sglang_start-*.json", timeout=590)
    verdicts.assert_passed()
