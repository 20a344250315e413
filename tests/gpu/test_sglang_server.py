"""The SGLang plugin on a real SGLang server (check_sglang_server.py, which stays runnable by hand): plain SGLang
vs Foundry SAVE vs Foundry LOAD, and with a second GPU the missing and truncated archive fallbacks. Needs sglang
staged (docs/STAGING.md)."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.sglang]


def test_sglang_server(run_script, out_dir, verdicts):
    run_script("check_sglang_server.py", "--out", str(out_dir), record="sglang_server.json", timeout=590)
    verdicts.assert_passed()
