"""Greedy decoding with the static cache equals HF `generate` and a cache-free reference."""

import pytest
import torch
from decode_helpers import EOS, PAD, first_eos, prefixes

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder
from vlv_engine.engine.generation import generate_reference
from vlv_engine.testing import reference_greedy_tokens

GREEDY = GenerationConfig(max_new_tokens=16, num_beams=1)


@pytest.mark.parametrize("batch", [1, 3, 8])  # 3 runs in the 4 bucket with a padding row
@pytest.mark.parametrize("which", ["plain", "eos_prone"])
def test_greedy_equals_generate_and_the_cache_free_reference(batch, which, llm, eos_llm):
    model = llm if which == "plain" else eos_llm
    prefix = prefixes(batch, seed=10 + batch)
    out = StaticDecoder(model).generate(prefix, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    ref = generate_reference(model, prefix, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    assert out.dtype == torch.long and out.shape == ref.shape
    assert torch.equal(out, ref)
    recomputed = reference_greedy_tokens(model, prefix, GREEDY.max_new_tokens, EOS)
    for row, tokens in zip(out, recomputed):
        assert row[:len(tokens)].tolist() == tokens
        assert row[len(tokens):].eq(PAD).all()  # padded after EOS
    if batch == 8:
        assert len({tuple(r) for r in out.tolist()}) == 8  # the prefixes give different captions
        ends = first_eos(out)
        if which == "plain":
            assert out.shape[1] == GREEDY.max_new_tokens
        else:  # some rows end early, at different steps, some run to the limit
            assert len({e for e in ends if e is not None}) >= 2 and None in ends


def test_all_rows_ending_early_stop_the_loop(eos_llm):
    """Six rows (bucket 8): the loop ends when the real rows end, whatever the padding rows do."""
    prefix = prefixes(6, seed=2)
    gen = GenerationConfig(max_new_tokens=40, num_beams=1)
    out = StaticDecoder(eos_llm).generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    ref = generate_reference(eos_llm, prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out, ref)
    ends = first_eos(out)
    assert None not in ends and out.shape[1] == max(ends) + 1 < 20


def test_without_eos_every_row_runs_to_max_new_tokens(eos_llm):
    """eos_token_id=None means no EOS (HF generate would fall back to the model's
    generation_config), checked against the cache-free reference with an EOS never produced."""
    prefix = prefixes(3, seed=2)
    out = StaticDecoder(eos_llm).generate(prefix, GREEDY, eos_token_id=None, pad_token_id=PAD)
    assert out.shape == (3, GREEDY.max_new_tokens) and (out == EOS).any()  # decodes on past EOS
    assert out.tolist() == reference_greedy_tokens(eos_llm, prefix, GREEDY.max_new_tokens, eos_token_id=-1)


def test_pad_id_defaults_to_eos(eos_llm):
    prefix = prefixes(4, seed=3)
    out = StaticDecoder(eos_llm).generate(prefix, GREEDY, eos_token_id=EOS, pad_token_id=None)
    ref = generate_reference(eos_llm, prefix, GREEDY, eos_token_id=EOS, pad_token_id=None)
    assert torch.equal(out, ref)
