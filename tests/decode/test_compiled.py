"""The decode step under torch.compile (slow: each cache shape compiles once, ~30 s on a CPU)."""

import pytest
import torch
from decode_helpers import EOS, PAD, prefixes

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder, decode_step, prefill

pytestmark = pytest.mark.slow


def test_compiled_step_equals_eager_and_compiles_once_per_cache(eos_llm):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, eager = StaticDecoder(eos_llm, compile=True), StaticDecoder(eos_llm)
    greedy = GenerationConfig(max_new_tokens=16, num_beams=1)
    beams = GenerationConfig(max_new_tokens=16, num_beams=2)

    def check(batch, seed, gen):
        prefix = prefixes(batch, seed=seed)
        out = compiled.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(out, eager.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD))

    check(3, 70, greedy)  # compiles the step for the 4-row cache
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(4, 71, greedy)  # the same bucket, other prefixes and lengths: no recompile
        check(2, 72, beams)  # 2 rows x 2 beams: the same 4-row cache, reordered inside the beam step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the step and the beam step
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(1, 73, GenerationConfig(max_new_tokens=16, num_beams=4))  # 1 x 4 beams: the same cache again
        check(2, 75, beams)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2

    # The compiled step's logits match the eager step's closely at every position.
    cache = compiled.cache(4, 64)
    cache.reset()
    prefix = prefixes(4, seed=74)
    logits = prefill(eos_llm, cache, prefix)
    ids = logits.argmax(-1, keepdim=True)
    for t in range(4):
        pos = torch.tensor([prefix.shape[1] + t])
        snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        fast = compiled.step_fn(eos_llm, cache, ids, pos)
        for layer, (k, v) in zip(cache.layers, snapshot):  # rewind and redo eagerly
            layer.keys.copy_(k)
            layer.values.copy_(v)
        slow = decode_step(eos_llm, cache, ids, pos)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        ids = slow.argmax(-1, keepdim=True)
