"""Batched beam search with the static cache equals HF `generate`'s beam search."""

import pytest
import torch
from decode_helpers import EOS, PAD, first_eos, pad_after_eos, prefixes

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder
from vlv_engine.engine.generation import generate_reference


def _both(model, prefix, gen):
    out = StaticDecoder(model).generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    ref = generate_reference(model, prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    return out, ref


@pytest.mark.parametrize("num_beams", [2, 3, 4])
@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize("which", ["plain", "eos_prone"])
def test_beam_search_equals_generate(num_beams, early_stopping, which, llm, eos_llm):
    model = llm if which == "plain" else eos_llm
    prefix = prefixes(6, seed=20 + num_beams)  # bucket 8: two padding rows
    gen = GenerationConfig(max_new_tokens=12, num_beams=num_beams, early_stopping=early_stopping)
    out, ref = _both(model, prefix, gen)
    assert out.shape == ref.shape
    assert torch.equal(out, pad_after_eos(ref))
    ends = first_eos(out)
    if which == "plain":  # the limit ends most hypotheses
        assert out.shape[1] == gen.max_new_tokens and ends.count(None) >= 3
    else:  # EOS ends most of them, at different steps
        assert len({e for e in ends if e is not None}) >= 2


@pytest.mark.parametrize("length_penalty", [0.0, 2.0, -1.0])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_length_penalty_and_early_stopping_modes(length_penalty, early_stopping, eos_llm):
    prefix = prefixes(5, seed=30)
    gen = GenerationConfig(max_new_tokens=14, num_beams=3, early_stopping=early_stopping,
                           length_penalty=length_penalty)
    out, ref = _both(eos_llm, prefix, gen)
    assert torch.equal(out, pad_after_eos(ref))


@pytest.mark.parametrize("seed", range(2))
def test_beam_search_on_more_prefixes(seed, eos_llm):
    """A wider net for near-ties: 16 rows, 4 beams, long enough for EOS and the limit."""
    prefix = prefixes(16, seed=100 + seed)
    gen = GenerationConfig(max_new_tokens=20, num_beams=4)
    out, ref = _both(eos_llm, prefix, gen)
    assert torch.equal(out, pad_after_eos(ref))


def test_hf_fills_after_eos_with_eos_when_pad_id_is_0(eos_llm):
    """Documents the one convention we do not copy (see vlv_engine.engine.beam)."""
    prefix = prefixes(8, seed=5)
    gen = GenerationConfig(max_new_tokens=16, num_beams=3)
    out, ref = _both(eos_llm, prefix, gen)
    short = [i for i, e in enumerate(first_eos(ref)) if e is not None and e + 1 < ref.shape[1]]
    assert short
    for i in short:
        assert ref[i, first_eos(ref)[i] + 1:].eq(EOS).all()
        assert out[i, first_eos(out)[i] + 1:].eq(PAD).all()
