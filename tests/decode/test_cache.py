"""Static caches: bucketing, reuse across calls, in-place beam reordering, batch invariance."""

import copy

import pytest
import torch
from decode_helpers import EOS, PAD, prefixes
from transformers import StaticCache

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder, bucket_batch, prefill, prefill_beams, reorder_cache_
from vlv_engine.engine.generation import generate_reference

GREEDY = GenerationConfig(max_new_tokens=16, num_beams=1)
BEAMS = GenerationConfig(max_new_tokens=16, num_beams=3)


def test_bucket_batch():
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    with pytest.raises(ValueError):
        bucket_batch(65)


def _ptrs(cache):
    return [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]


@pytest.mark.parametrize("gen", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_cache_reuse_across_calls_gives_fresh_results(gen, eos_llm):
    dec = StaticDecoder(eos_llm)
    calls = [(8, 0), (3, 1), (1, 2), (5, 3), (8, 4), (2, 5)]
    seen = {}
    for batch, seed in calls:
        prefix = prefixes(batch, seed=40 + seed)
        out = dec.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        fresh = StaticDecoder(eos_llm).generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        assert out.shape[0] == batch and torch.equal(out, fresh)
        rows = bucket_batch(batch) * gen.num_beams
        (key, cache), = [(k, c) for k, c in dec._caches.items() if k[0] == rows]
        seen.setdefault(key, (cache, _ptrs(cache)))
        assert seen[key][0] is cache and seen[key][1] == _ptrs(cache)  # reset, not reallocated
        assert cache.layers[0].keys.shape[0] == rows
    assert sorted(k[0] // gen.num_beams for k in seen) == [1, 2, 4, 8]
    assert len(dec._caches) == 4


def test_caches_are_lru_bounded(llm):
    dec = StaticDecoder(llm, max_caches=2)
    for batch in (1, 2, 4):
        dec.generate(prefixes(batch, seed=batch), GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    assert sorted(k[0] for k in dec._caches) == [2, 4]
    # Search states (and on CUDA their graphs) hold their cache: they go with it.
    assert set(dec._programs) == set(dec._caches)
    key = next(k for k in dec._caches if k[0] == 2)
    ((state_before, _),) = dec._programs[key].values()
    dec.generate(prefixes(2, seed=9), GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    ((state_after, _),) = dec._programs[key].values()
    assert state_after is state_before  # reused, not remade
    dec.clear()
    assert not dec._caches and not dec._programs


def test_cache_length_is_rounded_up(llm):
    dec = StaticDecoder(llm, length_multiple=64)
    dec.generate(prefixes(2, seed=0), GenerationConfig(max_new_tokens=5, num_beams=1), eos_token_id=EOS,
                 pad_token_id=PAD)
    dec.generate(prefixes(2, seed=1), GenerationConfig(max_new_tokens=50, num_beams=1), eos_token_id=EOS,
                 pad_token_id=PAD)
    assert [k[:2] for k in dec._caches] == [(2, 64)]  # 8 + 5 and 8 + 50 share one cache


@pytest.mark.parametrize("gen", [GREEDY, BEAMS], ids=["greedy", "beams"])
def test_a_rows_tokens_do_not_depend_on_the_other_rows(gen, eos_llm):
    dec = StaticDecoder(eos_llm)
    prefix = prefixes(8, seed=50)
    together = dec.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
    width = together.shape[1]
    for i in range(8):
        alone = dec.generate(prefix[i:i + 1], gen, eos_token_id=EOS, pad_token_id=PAD)
        alone = torch.nn.functional.pad(alone, (0, width - alone.shape[1]), value=PAD)
        assert torch.equal(alone[0], together[i])
    shuffled = dec.generate(prefix.flip(0), gen, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(shuffled, together.flip(0))


def test_batches_beyond_the_largest_bucket_are_split(eos_llm):
    dec = StaticDecoder(eos_llm, batch_buckets=(1, 2, 4))
    prefix = prefixes(7, seed=60)
    out = dec.generate(prefix, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    ref = generate_reference(eos_llm, prefix, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out, ref)
    assert sorted(k[0] for k in dec._caches) == [4]


def test_empty_batch_and_no_new_tokens(llm):
    dec = StaticDecoder(llm)
    assert dec.generate(prefixes(0, seed=0), GREEDY, eos_token_id=EOS, pad_token_id=PAD).shape == (0, 0)
    out = dec.generate(prefixes(2, seed=0), GenerationConfig(max_new_tokens=0, num_beams=1), eos_token_id=EOS,
                       pad_token_id=PAD)
    assert out.shape == (2, 0)


def test_reorder_cache_in_place(llm):
    cache = StaticCache(config=llm.config, max_cache_len=6)
    cache.early_initialization(4, 1, 16, torch.float32, torch.device("cpu"))
    for layer in cache.layers:
        layer.keys.copy_(torch.arange(4.0).view(4, 1, 1, 1).expand_as(layer.keys))
        layer.values.copy_(-torch.arange(4.0).view(4, 1, 1, 1).expand_as(layer.values))
    before = _ptrs(cache)
    reorder_cache_(cache, torch.tensor([2, 2, 0, 1]), length=3)
    assert _ptrs(cache) == before
    for layer in cache.layers:
        assert layer.keys[:, 0, :3, 0].tolist() == [[2.0] * 3, [2.0] * 3, [0.0] * 3, [1.0] * 3]
        assert layer.values[:, 0, :3, 0].tolist() == [[-2.0] * 3, [-2.0] * 3, [-0.0] * 3, [-1.0] * 3]
        assert layer.keys[:, 0, 3:, 0].tolist() == [[float(r)] * 3 for r in range(4)]  # past `length`: untouched


def test_beam_prefill_runs_each_image_once(llm):
    dec = StaticDecoder(llm)
    x = prefixes(3, seed=9)
    nq = x.shape[1]
    cache, scratch, expanded = dec.cache(9, 64), dec.prefill_cache(3, 64), StaticDecoder(llm).cache(9, 64)
    cache.reset(), expanded.reset()
    rows_seen = []
    hook = llm.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["inputs_embeds"].shape[0]),
                                         with_kwargs=True)
    try:
        logits = prefill_beams(llm, cache, scratch, x, 3)
    finally:
        hook.remove()
    assert rows_seen == [3]  # not 9
    want = prefill(llm, expanded, x.repeat_interleave(3, dim=0))  # HF's way: K copies of the prefix
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache.layers, expanded.layers):
        torch.testing.assert_close(a.keys[:, :, :nq], b.keys[:, :, :nq], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values[:, :, :nq], b.values[:, :, :nq], rtol=1e-5, atol=1e-5)
    # the beam search's own caches and the prefill caches are kept apart
    assert list(dec._caches) != list(dec._prefill_caches)


def test_the_cache_goes_by_the_models_own_keyword(llm):
    """transformers 5.24 renamed `past_key_values` to `cache`: a model that knows the new
    name gets it (the old one warns, and goes in 5.40), an older one keeps the old name."""
    import copy
    import inspect
    import warnings

    from vlv_engine.engine.decode import cache_keyword

    names = inspect.signature(llm.forward).parameters
    want = "cache" if "cache" in names else "past_key_values"
    model = copy.deepcopy(llm)
    assert cache_keyword(model) == want and model.vlv_cache_keyword == want
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # how transformers deprecates a keyword
        StaticDecoder(model).generate(prefixes(2, seed=3), BEAMS, eos_token_id=EOS, pad_token_id=PAD)

    class OldForward(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            raise AssertionError("not called")

    assert cache_keyword(OldForward()) == "past_key_values"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_feeds_the_lm_head_one_contiguous_row_per_image(llm, dtype):
    """The prefill's logits come from a contiguous [R, 1, H] gather of the last position: a
    linear layer on a strided view ([R, 1, H] of the [R, Nq, H] hidden states) runs as a
    batched product over the vocabulary table expanded R times, which a CPU copies (seconds
    and gigabytes in bf16 at real vocabulary sizes). Its logits are the full forward's last."""
    from vlv_engine.engine.decode import allocate_cache

    model = copy.deepcopy(llm).to(dtype)
    x = prefixes(5, 2).to(dtype)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    logits = prefill(model, allocate_cache(model, 5, 64), x)
    assert seen == [((5, 1, x.shape[-1]), True)]
    with torch.no_grad():
        want = model(inputs_embeds=x, use_cache=False).logits[:, -1].float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits, want, rtol=tol, atol=tol * want.abs().max().item())
