"""Decode loop: our static-cache loop (and a quantized one) against HF generate, greedy,
fixed length (EOS never emitted)."""

import pytest
import torch

from vlv_engine.bench.decode import variant_llm
from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder
from vlv_engine.engine.quantize import quantize_llm

TOKENS = 16


def _prefix(setup, batch):
    llm = setup.reference.model.caption_decoder.llm
    hidden = llm.config.get_text_config(decoder=True).hidden_size
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, setup.reference.config.encoder.num_queries, hidden, generator=g) * 3


def _decoders(setup):
    int8 = quantize_llm(variant_llm(setup, setup.reference.model.caption_decoder.llm.dtype), "int8_dynamic")
    return {"reference": setup.reference_decoder, "fast": setup.fast_decoder, "int8_dynamic": StaticDecoder(int8)}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("path", ["reference", "fast", "int8_dynamic"])
def test_decode(benchmark, bench_setup, batch, path):
    decoder = _decoders(bench_setup)[path]
    benchmark.group = f"decode batch {batch}"
    prefix = _prefix(bench_setup, batch).to(decoder.llm.dtype)
    gen = GenerationConfig(max_new_tokens=TOKENS, num_beams=1)
    out = benchmark.pedantic(decoder.generate, args=(prefix, gen),
                             kwargs={"eos_token_id": bench_setup.never_eos, "pad_token_id": 0},
                             rounds=5, warmup_rounds=1)
    assert out.shape == (batch, TOKENS)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = batch * TOKENS / benchmark.stats.stats.median
    if path == "fast" and bench_setup.notes["quantize"] == "none" and bench_setup.notes["fast_dtype"] == "float32":
        ref = bench_setup.reference_decoder.generate(prefix, gen, eos_token_id=bench_setup.never_eos, pad_token_id=0)
        assert torch.equal(out, ref)  # unquantized fp32: the reference's tokens exactly
