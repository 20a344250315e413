"""The product path on the GPU: ``python -m foundry_sglang.launch`` twice on the built-in engine.

Start 1 (empty archive folder, --foundry-mode auto) captures the decode graphs and saves them; start 2 restores
them. Each start serves the same greedy requests over HTTP; answers must be identical. Reported: the time from
process start to a healthy server and the engine's own graph-phase time from its log.
"""
from __future__ import annotations

import re

import pytest

from gpu.launch_servers import PROMPTS, start

pytestmark = pytest.mark.gpu

LAYERS = 36  # the whole qwen3-8b shape


def graph_line(log) -> str:
    """The session mode and graph-phase time a start logged."""
    text = log.read_text()
    m = re.findall(r"(\d+) decode graphs ready in ([0-9.]+) s", text)
    mode = re.findall(r"foundry: session (\w+)", text)
    return f"{mode[-1] if mode else '?'}; graphs {m[-1][1] + ' s' if m else '?'}"


def test_second_start_restores_and_answers_the_same(out_dir, tmp_path, verdicts):
    archive = tmp_path / "archives"  # GBs: not under $OUT
    # A 320-token vocabulary keeps most generated ids printable bytes, so answers compare as text.
    model = f"builtin:qwen3-8b?num_hidden_layers={LAYERS}&vocab_size=320"
    first = start(model, archive, out_dir / "launch_first.log")
    second = start(model, archive, out_dir / "launch_second.log") if first["ok"] else {"ok": False}
    verdicts.figures.update(model=model, first=first, second=second)
    for name, run, log in (("start 1 (auto -> SAVE)", first, "launch_first.log"),
                           ("start 2 (auto -> LOAD)", second, "launch_second.log")):
        verdicts.row(name, run["ok"], f"healthy after {run.get('ready_s', 0):.1f}s; {graph_line(out_dir / log)}"
                     if run["ok"] else run.get("error", ""))
    if first["ok"] and second["ok"]:
        same = sum(x == y for x, y in zip(first["answers"], second["answers"]))
        verdicts.row("sequential greedy answers identical", same == len(PROMPTS),
                     f"{same}/{len(PROMPTS)}; e.g. {first['answers'][0][:40]!r}")
        conc = sum(x == y for x, y in zip(first["concurrent"], second["concurrent"]))
        verdicts.row("concurrent greedy answers identical", None,
                     f"{conc}/{len(PROMPTS)} (batch shapes differ with arrival timing; bf16 near-ties may flip)")
    verdicts.assert_passed()
