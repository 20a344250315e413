"""tests/gpu/check_elastic.py without a GPU: it parses, imports what it runs, writes a model SGLang's OpenAI routes
can serve (config + byte-level tokenizer), and says in one line that it needs a GPU."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "check_elastic.py"


def load():
    spec = importlib.util.spec_from_file_location("check_elastic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", [[], ["--worker", "sglang", "--backend", "ray", "--share-gpu", "--standby", "1"]])
def test_without_a_gpu_it_says_so_in_one_line(tmp_path, extra):
    out = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *extra], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""
    [line] = out.stderr.strip().splitlines()
    assert line == "check_elastic: needs a CUDA GPU (none is visible here); nothing was run"


def test_help_and_the_pieces_it_runs(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--worker" in out.stdout and "--share-gpu" in out.stdout
    check = load()
    args = check.parse_args(["--worker", "sglang", "--backend", "ray", "--models", "dense,moe"])
    assert (args.worker, args.backend, args.share_gpu) == ("sglang", "ray", None)
    flags = check.sglang_flags(share=True)
    assert "--skip-tokenizer-init" not in flags and "--host" not in flags and "--max-total-tokens" in flags
    from bench.elastic_standby_switch import PROMPTS, Load, counts  # noqa: F401  (what run_deployment imports)

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    model = check.write_model(tmp_path, "moe")
    config = json.loads((model / "config.json").read_text())
    assert config["vocab_size"] == check.VOCAB and config["architectures"] == ["Qwen3MoeForCausalLM"]
    tok = transformers.AutoTokenizer.from_pretrained(str(model))
    assert len(tok) == check.VOCAB and tok.eos_token_id == config["eos_token_id"]
    assert tok.decode(tok.encode(PROMPTS[0])) == PROMPTS[0]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
