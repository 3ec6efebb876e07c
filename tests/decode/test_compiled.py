"""The token steps under torch.compile (slow: each cache and search compiles once, ~30 s on a CPU)."""

import pytest
import torch
from decode_helpers import EOS, PAD, prefixes

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder

pytestmark = pytest.mark.slow


def test_compiled_token_steps_equal_eager_and_compile_once_per_cache_and_search(eos_llm):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, eager = StaticDecoder(eos_llm, compile=True), StaticDecoder(eos_llm)
    greedy = GenerationConfig(max_new_tokens=16, num_beams=1)
    beams = GenerationConfig(max_new_tokens=16, num_beams=2)

    def check(batch, seed, gen):
        prefix = prefixes(batch, seed=seed)
        out = compiled.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(out, eager.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD))

    check(3, 70, greedy)  # compiles the greedy token step for the 4-row cache
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(4, 71, greedy)  # the same bucket, other prefixes and lengths: no recompile
        check(4, 76, GenerationConfig(max_new_tokens=40, num_beams=1))  # another length, the same cache
        check(2, 72, beams)  # 2 rows x 2 beams: the same 4-row cache, reordered inside the beam step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the greedy and the beam token step
    with torch._dynamo.config.patch(error_on_recompile=True):
        check(2, 75, beams)
        check(2, 77, GenerationConfig(max_new_tokens=30, num_beams=2))  # another length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    check(1, 73, GenerationConfig(max_new_tokens=16, num_beams=4))  # 1 x 4 beams: the same cache, another search
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    # One search state per (cache, search), reused across calls: a captured graph's addresses stay put.
    assert list(compiled._programs) == [(4, 64, torch.float32, torch.device("cpu"))]
    assert len(compiled._programs[(4, 64, torch.float32, torch.device("cpu"))]) == 3
    # Another cache (the 8-row bucket) and back: each call runs its own cache's entry.
    check(6, 78, greedy)
    check(3, 79, greedy)
    check(6, 80, GenerationConfig(max_new_tokens=24, num_beams=1))
    check(2, 81, beams)
