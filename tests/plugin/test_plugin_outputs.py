"""SGLang's decode graphs return ``LogitsProcessorOutput`` (a dataclass with mostly-None fields). On the H200, SAVE
stopped with "output leaf of type NoneType is not a tensor": the output must round-trip through the archive's
output description (tensors by address, None and constants by value, the structure as a JSON treespec)."""
import torch

from foundry_core.outputs import flatten_outputs, unflatten_outputs
from foundry_sglang.plugin.hooks import register_output_pytrees


def test_logits_processor_output_round_trips():
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    register_output_pytrees()
    logits, hidden = torch.randn(4, 32), torch.randn(4, 8)
    out = LogitsProcessorOutput(next_token_logits=logits, hidden_states=hidden)
    specs, tree, constants = flatten_outputs("decode_bs4", out)
    assert [s.address for s in specs] == [logits.data_ptr(), hidden.data_ptr()]
    assert constants and all(v is None for v in constants.values())
    back = unflatten_outputs([logits, hidden], tree, constants)
    assert isinstance(back, LogitsProcessorOutput)
    assert back.next_token_logits is logits and back.hidden_states is hidden and back.next_token_logprobs is None
