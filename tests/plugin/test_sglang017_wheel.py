"""The plugin against the real SGLang 0.5.17 wheel (what runs on the H200), in a subprocess with it first on the path.

Opt-in: ``FOUNDRY_SGLANG017_SITE`` names a directory holding SGLang 0.5.17 for this Python, made by
``python3 scripts/stage_sglang.py host`` (about 60 MB downloaded once; CI installs only 0.5.23).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = os.environ.get("FOUNDRY_SGLANG017_SITE")
pytestmark = pytest.mark.skipif(not SITE, reason="set FOUNDRY_SGLANG017_SITE (python3 scripts/stage_sglang.py host)")

PROBE = r"""
import json, pkgutil, sys
import sglang
from sglang.srt.server_args import prepare_server_args
from foundry_sglang import plugin
from foundry_sglang.launch import apply_pins

model, mode = sys.argv[1], sys.argv[2]
argv = ["--model-path", model, "--device", "cuda", "--load-format", "dummy", "--skip-tokenizer-init"]
out = {"version": sglang.__version__}
pinned, added = apply_pins(list(argv))
args = prepare_server_args(pinned)
out["pinned"] = added
out["config_type"] = type(args.cuda_graph_config).__name__
out["refusals_pinned"] = plugin.refusals(args)
out["refusals_default"] = plugin.refusals(prepare_server_args(argv))
try:
    out["check_pinned"] = plugin.check_flags(args, mode)
except Exception as err:
    out["check_pinned"] = f"raised {type(err).__name__}: {err}"
missing = []
for target, *_ in plugin.HOOKS:
    owner, attr = target.rsplit(".", 1)
    try:
        if attr not in pkgutil.resolve_name(owner).__dict__:
            missing.append(target)
    except Exception:
        missing.append(target)
out["missing_targets"] = missing
print("RESULT " + json.dumps(out))
"""


def run_probe(tmp_path, mode="save") -> dict:
    model = tmp_path / "qwen3"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2,
        "vocab_size": 1024, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SITE, str(ROOT)]), SGLANG_IS_FLASHINFER_AVAILABLE="false")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(model), mode], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_real_017_pinned_flags_are_accepted_and_hooks_resolve(tmp_path):
    r = run_probe(tmp_path)
    assert r["version"] == "0.5.17"
    assert r["pinned"] == ["--cuda-graph-backend-prefill", "disabled"]
    assert r["config_type"] == "CudaGraphConfig"  # 0.5.17 folds every graph flag into this object
    assert r["refusals_pinned"] == [] and r["check_pinned"] is None
    assert any("prefill CUDA graphs" in x for x in r["refusals_default"])  # breakable by default on CUDA
    assert r["missing_targets"] == []
