"""The GPU check of elastic switches (tests/gpu/elastic_switches.py) without a GPU: its flags parse, it imports what
it runs, and it writes a model SGLang's OpenAI routes can serve (a config and a byte-level tokenizer). Its one line
without a GPU: tests/scripts/test_scripts_without_gpu.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from gpu import elastic_switches as check

ROOT = Path(__file__).resolve().parents[2]


def test_help_and_the_pieces_it_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tests/gpu/check_elastic.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--worker" in out.stdout and "--share-gpu" in out.stdout
    args = check.build_parser().parse_args(["--worker", "sglang", "--backend", "ray", "--models", "dense,moe"])
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
