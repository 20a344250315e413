"""TP=2 and EP=2 over gloo (two spawned ranks) compute what TP=1 computes."""
import pytest
import torch

from foundry_sglang.engine import LLM, EngineArgs, SamplingParams
from foundry_sglang.engine.config import ConfigError
from foundry_sglang.engine.flags import build_arg_parser, engine_args_from

PROMPTS = ["hello world", "the quick brown fox", "a", "xyz" * 20]


def run(model, tp, ep):
    with LLM(EngineArgs(model=model, tp=tp, ep=ep, max_model_len=256, max_num_seqs=8)) as llm:
        eng = llm.engine
        eng.add_request(PROMPTS[1], SamplingParams(max_tokens=1, temperature=0))
        eng.step()
        logits = eng.last_logits.clone()
        tokens = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0,
                                                                            ignore_eos=True))]
    return logits, tokens


@pytest.mark.slow
@pytest.mark.parametrize("model,layouts", [("builtin:tiny", [(2, 1)]),
                                           ("builtin:tiny-moe", [(2, 1), (1, 2), (2, 2)])])
def test_parallel_layouts_equal_tp1(model, layouts):
    ref_logits, ref_tokens = run(model, 1, 1)
    for tp, ep in layouts:
        logits, tokens = run(model, tp, ep)
        assert tokens == ref_tokens, f"tp={tp} ep={ep}"
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_bad_layouts_are_rejected():
    with pytest.raises(ConfigError, match="tp and --ep"):
        EngineArgs(tp=2, ep=4).validate()
    with pytest.raises(ConfigError, match="foundry-archive"):  # resolved where the flags are parsed
        engine_args_from(build_arg_parser().parse_args(["--foundry-mode", "save"]))
