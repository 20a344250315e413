"""Continuous batching, preemption, stop conditions and sampling of the built-in engine (CPU, tiny preset)."""
import pytest
import torch

from foundry_sglang.engine import LLM, EngineArgs, SamplingParams
from foundry_sglang.engine.sampling import hashed_uniform, sample

PROMPTS = ["hello world", "the quick brown fox jumps", "a", "xyz" * 40, "Foundry", "0123456789" * 3]


@pytest.fixture(scope="module")
def llm():
    with LLM(EngineArgs(model="builtin:tiny", max_num_seqs=8, max_model_len=512)) as engine:
        yield engine


def greedy(n=20):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_continuous_batching_equals_one_at_a_time(llm):
    alone = [llm.generate(p, greedy())[0].token_ids for p in PROMPTS]
    together = [o.token_ids for o in llm.generate(PROMPTS, greedy())]
    assert together == alone
    # staggered arrivals: requests join a running batch between decode steps
    eng = llm.engine
    done, pending = {}, list(enumerate(PROMPTS))
    ids = {}
    while pending or eng.has_unfinished():
        if pending:
            i, p = pending.pop(0)
            ids[eng.add_request(p, greedy()).request_id] = i
        for out in eng.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
    assert [done[i] for i in range(len(PROMPTS))] == alone


def test_preemption_keeps_greedy_outputs():
    with LLM(EngineArgs(model="builtin:tiny", max_num_seqs=8, page_size=4, num_kv_pages=48)) as small:
        out = [o.token_ids for o in small.generate(PROMPTS[:4], greedy(24))]
        assert small.engine.scheduler.num_preemptions > 0
        alone = [small.generate(p, greedy(24))[0].token_ids for p in PROMPTS[:4]]
    assert out == alone


def test_max_tokens_and_stop_strings(llm):
    base = llm.generate("stop test", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert base.num_output_tokens == 30 and base.finish_reason == "length"
    text = base.text
    # pick a stop string from the middle of the generated text
    pos = next(i for i in range(5, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[pos:pos + 2]
    out = llm.generate("stop test", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(stop)]
    tok = base.token_ids[3]
    out = llm.generate("stop test", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]


def test_eos_stops_unless_ignored(llm):
    eng = llm.engine
    base = llm.generate("eos", greedy(12))[0]
    eos = base.token_ids[4]
    saved = eng.tokenizer.stop_token_ids
    eng.tokenizer.stop_token_ids = {eos}
    try:
        out = llm.generate("eos", SamplingParams(max_tokens=12, temperature=0))[0]
        ignored = llm.generate("eos", greedy(12))[0]
    finally:
        eng.tokenizer.stop_token_ids = saved
    cut = base.token_ids.index(eos)
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:cut + 1]
    assert out.text == eng.tokenizer.decode(base.token_ids[:cut])   # the EOS token adds no text
    assert ignored.token_ids == base.token_ids and ignored.finish_reason == "length"


def test_prompt_too_long_and_bad_params(llm):
    with pytest.raises(ValueError, match="context length"):
        llm.engine.add_request([1] * 5000, greedy())
    with pytest.raises(ValueError, match="max_tokens"):
        llm.engine.add_request("hi", SamplingParams(max_tokens=-1))
    with pytest.raises(ValueError, match="top_p"):
        llm.engine.add_request("hi", SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="token ids"):
        llm.engine.add_request([1, 10 ** 9], greedy())


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    a = llm.generate("sample me", sp)[0].token_ids
    b = llm.generate(["other", "sample me", "third"], [greedy(), sp, greedy()])[1].token_ids
    assert a == b
    c = llm.generate("sample me", SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert c.token_ids != a


def test_top_p_and_top_k_bounds():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 400))
    seeds = list(range(400))
    toks = sample(logits, [1.0] * 400, [0.7] * 400, [-1] * 400, seeds, [0] * 400)
    assert set(toks) <= {0, 1} and {0, 1} <= set(toks)          # nucleus {0.5, 0.3} covers 0.7
    toks = sample(logits, [1.0] * 400, [1.0] * 400, [1] * 400, seeds, [0] * 400)
    assert set(toks) == {0}                                      # top_k=1 is greedy
    toks = sample(logits, [1.0] * 400, [1e-6] * 400, [-1] * 400, seeds, [0] * 400)
    assert set(toks) == {0}                                      # tiny top_p keeps the best token
    toks = sample(logits, [1.0] * 400, [1.0] * 400, [-1] * 400, seeds, [0] * 400)
    freq = torch.bincount(torch.tensor(toks), minlength=4).float() / 400
    assert abs(freq[0] - 0.5) < 0.1 and abs(freq[3] - 0.05) < 0.05
    u = hashed_uniform(torch.tensor([1, 2]), torch.tensor([0, 0]), 1000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.05


def test_abort_frees_pages(llm):
    eng = llm.engine
    free0 = len(eng.allocator.free)
    seq = eng.add_request("abort me", greedy(50))
    eng.step()
    out = eng.abort(seq.request_id)
    assert out.finished and out.finish_reason == "abort"
    assert len(eng.allocator.free) == free0 and not eng.has_unfinished()
