"""What the decode loop does differently on CUDA, checked on the CPU: deferred stop checks
(each check is a host sync there; checking every k steps gives exactly the tokens and
length of checking every step), the compiled step's inductor options, and the row minimum
of int8 dynamic's compiled step."""

import pytest
import torch
from decode_helpers import EOS, PAD, first_eos, prefixes

import vlv_engine.engine.decode as decode
from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder


def _generate(model, prefix, gen, every, monkeypatch):
    monkeypatch.setattr(decode, "stop_check_interval", lambda device: every)
    return StaticDecoder(model).generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("every", [3, 8, 64])
@pytest.mark.parametrize("batch", [1, 6])
def test_greedy_with_late_checks_equals_checking_every_step(every, batch, eos_llm, monkeypatch):
    prefix = prefixes(batch, seed=40 + batch)
    gen = GenerationConfig(max_new_tokens=30, num_beams=1)
    want = _generate(eos_llm, prefix, gen, 1, monkeypatch)
    got = _generate(eos_llm, prefix, gen, every, monkeypatch)
    assert any(e is not None for e in first_eos(want)), "the test needs captions that end before the limit"
    assert want.shape[1] < gen.max_new_tokens or batch == 1
    assert got.shape == want.shape and (got == want).all()


@pytest.mark.parametrize("every", [3, 8])
@pytest.mark.parametrize("early_stopping,length_penalty", [(True, 1.0), (False, 1.0), ("never", 2.0), (True, -1.0)])
def test_beam_search_with_late_checks_equals_checking_every_step(every, early_stopping, length_penalty, eos_llm,
                                                                 monkeypatch):
    prefix = prefixes(5, seed=60)
    gen = GenerationConfig(max_new_tokens=24, num_beams=3, early_stopping=early_stopping,
                           length_penalty=length_penalty)
    want = _generate(eos_llm, prefix, gen, 1, monkeypatch)
    got = _generate(eos_llm, prefix, gen, every, monkeypatch)
    if early_stopping != "never":  # "never" with a length bonus keeps the longest beams
        assert any(e is not None for e in first_eos(want))
    assert got.shape == want.shape and (got == want).all()


def test_cuda_step_options_are_known_to_inductor_and_scheme_specific():
    """The compiled step's inductor options on CUDA (checked here without a GPU): inductor's
    CUDA graphs only when the decoder does not capture the step itself; torchao's tuning only
    for torchao schemes; every key one inductor knows."""
    import torch._inductor.config as inductor_config

    from vlv_engine.engine.decode import cuda_step_options

    for plain in (None, "int8_cpu", "int4_weight_only", "fp8"):  # nothing inductor generates to tune
        assert cuda_step_options(plain) == {"triton.cudagraphs": False}
        assert cuda_step_options(plain, inductor_graphs=True) == {"triton.cudagraphs": True}
    weight_only = cuda_step_options("int8_weight_only")
    assert not weight_only["triton.cudagraphs"] and weight_only.get("coordinate_descent_tuning") is True
    dynamic = cuda_step_options("int8_dynamic")
    assert dynamic.get("force_fuse_int_mm_with_mul") is True and "coordinate_descent_tuning" not in dynamic
    assert all(k == "triton.cudagraphs" or hasattr(inductor_config, k) for k in {**weight_only, **dynamic})


def test_cuda_graph_settings_are_checked(eos_llm):
    """The decoder captures its own CUDA graphs only for a compiled step on CUDA; asking for
    them elsewhere, or stacking inductor's on top, is refused with the reason."""
    assert not StaticDecoder(eos_llm, compile=True).capture  # a CPU model: nothing to capture
    with pytest.raises(ValueError, match="needs compile=True and an LLM on a CUDA device"):
        StaticDecoder(eos_llm, compile=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs compile=True"):
        StaticDecoder(eos_llm, cuda_graphs=True)


def test_int8_dynamic_compiled_on_cuda_runs_at_least_17_rows(eos_llm, monkeypatch):
    """cuBLAS's int8 product refuses <= 16 rows: the compiled CUDA int8-dynamic step pads
    small batches to a 32-row bucket. Checked on the CPU by forcing the rule: padding rows
    change nothing of the real rows' tokens."""
    from vlv_engine.engine.decode import min_step_rows

    assert min_step_rows("int8_dynamic", "cuda", True) == 17
    assert min_step_rows("int8_dynamic", "cuda", False) == 1  # eager falls back by itself
    assert min_step_rows("int8_weight_only", "cuda", True) == 1
    assert min_step_rows("int8_dynamic", "cpu", True) == 1
    prefix = prefixes(2, seed=80)
    gen = GenerationConfig(max_new_tokens=12, num_beams=1)
    decoder = StaticDecoder(eos_llm)
    want = decoder.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    monkeypatch.setattr(decode, "min_step_rows", lambda scheme, device_type, compiled: 17)
    got = decoder.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, want)
    assert any(key[0] == 32 for key in decoder._caches)  # it ran in the 32-row bucket
    beams = GenerationConfig(max_new_tokens=12, num_beams=4)
    decoder.generate(prefix, beams, eos_token_id=EOS, pad_token_id=PAD)
    assert any(key[0] == 4 * 8 for key in decoder._caches)  # 8 rows x 4 beams >= 17
