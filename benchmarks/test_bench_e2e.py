"""End to end (pixels -> caption tokens) at a fixed caption length, the preset's beams."""

import pytest
import torch

from vlv_engine.bench.pipelines import caption_tokens


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_e2e(benchmark, bench_setup, pixels, batch, path):
    s = bench_setup
    engine, decoder = (s.reference, s.reference_decoder) if path == "reference" else (s.fast, s.fast_decoder)
    gen = s.generation()
    benchmark.group = f"e2e batch {batch} ({gen.num_beams} beams, {s.new_tokens} tokens)"
    out = benchmark.pedantic(caption_tokens, args=(engine, decoder, pixels[batch], gen, s.never_eos),
                             rounds=3, warmup_rounds=1)
    assert out.shape == (batch, s.new_tokens)
    if s.notes["quantize"] == "none" and s.notes["fast_dtype"] == "float32":
        ref = caption_tokens(s.reference, s.reference_decoder, pixels[batch], gen, s.never_eos)
        assert torch.equal(out, ref)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["captions_per_s"] = batch / benchmark.stats.stats.median
