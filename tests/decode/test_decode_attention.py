"""One-token attention on grouped key/value heads (vlv_engine.engine.decode_attention)
against transformers' SDPA attention, which repeats the keys and values under compile.

Bounds: fp32 relative error < 1e-6, bf16 < 1e-2 (one rounding of the output)."""

import copy

import pytest
import torch
from decode_helpers import EOS, PAD, traced_decode_step
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import StaticDecoder, prepare_llm
from vlv_engine.engine.decode_attention import NAME, decode_sdpa, use_decode_attention
from vlv_engine.engine.generation import generate_reference


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _repeated(module, q, k, v, mask, scale):
    """The plain form: every key/value head repeated to its query heads."""
    g = module.num_key_value_groups
    out = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask,
                                                           scale=scale)
    return out.transpose(1, 2).contiguous()


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch,kv,groups,length,mask_kind",
                         [(1, 2, 8, 384, "bool"), (4, 2, 7, 50, "bool"), (3, 1, 2, 17, "float"), (2, 3, 4, 9, None),
                          (5, 2, 1, 33, "bool")])
def test_one_token_matches_repeated_heads(dtype, bound, batch, kv, groups, length, mask_kind):
    g = torch.Generator().manual_seed(batch * 100 + length)
    d = 16
    q = torch.randn(batch, kv * groups, 1, d, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv, length, d, generator=g).to(dtype) for _ in range(2))
    mask = None
    if mask_kind is not None:
        filled = torch.arange(length) < torch.randint(1, length + 1, (batch, 1), generator=g)  # [B, L]
        mask = filled[:, None, None, :]
        if mask_kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    module = _Attn(groups)
    got, _ = decode_sdpa(module, q, k, v, mask, scaling=d ** -0.5)
    want = _repeated(module, q.float(), k.float(), v.float(), None if mask is None else mask if mask.dtype == torch.bool
                     else mask.float(), d ** -0.5)
    assert got.shape == (batch, 1, kv * groups, d) and got.dtype == dtype
    assert rel_err(got, want) < bound


def test_other_calls_go_to_transformers_unchanged():
    g = torch.Generator().manual_seed(0)
    module = _Attn(2)
    q = torch.randn(2, 4, 5, 8, generator=g)  # a prefill: 5 query tokens
    k, v = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    per_head = torch.rand(2, 4, 1, 5, generator=g) > 0.3  # a mask per head
    per_head[..., 0] = True
    for query, mask in ((q, None), (q[:, :, :1], per_head)):
        got, _ = decode_sdpa(module, query, k, v, mask, scaling=0.3)
        want, _ = sdpa_attention_forward(module, query, k, v, mask, scaling=0.3)
        assert torch.equal(got, want)


def test_prepared_llm_gives_hf_tokens_and_keeps_its_checkpoint(llm, tmp_path):
    prepared = prepare_llm(copy.deepcopy(llm))
    assert prepared.config._attn_implementation == NAME and llm.config._attn_implementation == "sdpa"
    prefix = torch.randn(5, 8, llm.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for beams in (1, 3):
        gen = GenerationConfig(max_new_tokens=12, num_beams=beams)
        want = generate_reference(llm, prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(StaticDecoder(prepared).generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD), want)
    prepared.save_pretrained(tmp_path)
    back = type(llm).from_pretrained(tmp_path)  # HF's own layout and attention
    assert back.config._attn_implementation != NAME


def test_only_sdpa_models_switch(llm):
    eager = copy.deepcopy(llm)
    eager.set_attn_implementation("eager")
    assert not use_decode_attention(eager) and eager.config._attn_implementation == "eager"
    sdpa = copy.deepcopy(llm)
    assert use_decode_attention(sdpa) and use_decode_attention(sdpa)  # idempotent


def test_compiled_step_attends_on_the_unrepeated_cache(llm):
    """Under dynamo (where transformers' SDPA path repeats keys and values) every one-token
    attention of the prepared model reads the cache's own key/value heads."""
    prepared = prepare_llm(copy.deepcopy(llm))
    heads, kv = llm.config.num_attention_heads, llm.config.num_key_value_heads
    assert heads > kv  # the tiny model has grouped heads
    graphs, got, want = traced_decode_step(prepared, llm)
    assert rel_err(got, want) < 1e-6
    calls = [n for n in graphs[0].graph.nodes
             if n.op == "call_function" and n.target is torch._C._nn.scaled_dot_product_attention]
    assert len(calls) == llm.config.num_hidden_layers
    for node in calls:
        key = node.args[1].meta["example_value"]
        assert key.shape[1] == kv and node.args[0].meta["example_value"].shape[1] == kv


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_one_token_matches_repeated_heads_on_cuda(dtype, bound):
    """The paper model's shapes (2 key/value heads of 8 queries, head 128, a 384-position
    cache) through the GPU's SDPA kernels, 4 beams."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 16, 1, 128, generator=g)
    k, v = torch.randn(4, 2, 384, 128, generator=g), torch.randn(4, 2, 384, 128, generator=g)
    mask = (torch.arange(384) < torch.tensor([[100], [200], [300], [384]]))[:, None, None, :]
    module = _Attn(8)
    got, _ = decode_sdpa(module, q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype), mask.cuda(),
                         scaling=128 ** -0.5)
    want = _repeated(module, q.double(), k.double(), v.double(), mask, 128 ** -0.5)
    assert rel_err(got.cpu(), want) < bound


@needs_cuda
def test_prepared_llm_captured_on_cuda_gives_hf_tokens(llm):
    """fp32: the prepared model's compiled, captured token steps give HF `generate`'s tokens."""
    prepared = prepare_llm(copy.deepcopy(llm).cuda())
    reference = copy.deepcopy(llm).cuda()
    prefix = torch.randn(3, 8, llm.config.hidden_size, generator=torch.Generator().manual_seed(5)).cuda()
    decoder = StaticDecoder(prepared, compile=True)
    for beams in (1, 3):
        gen = GenerationConfig(max_new_tokens=12, num_beams=beams)
        want = generate_reference(reference, prefix, gen, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(decoder.generate(prefix, gen, eos_token_id=EOS, pad_token_id=PAD), want)
    assert not decoder.capture_failures
