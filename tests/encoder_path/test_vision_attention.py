"""Florence-2's channel attention as two products (vlv_engine.engine.vision_attention)
against transformers' SDPA attention. Bound: float32 relative error < 1e-5."""

import copy

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlv_engine.engine.vision_attention import CHANNEL_ATTENTION, NAME, use_vision_attention, vision_sdpa
from vlv_engine.testing import tiny_model


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def _module(name):
    return type(name, (torch.nn.Module,), {"is_causal": False})()


@pytest.mark.parametrize("batch,tokens,channels,groups", [(2, 2304, 128, 4), (1, 577, 96, 3), (3, 50, 64, 8)])
def test_channel_attention_matches_transformers(batch, tokens, channels, groups):
    """The module's own layout: q/k/v strided views of one [B, N, 3C] product, head dim N."""
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(batch, tokens, 3 * channels, generator=g)
    q, k, v = qkv.reshape(batch, tokens, 3, groups, channels // groups).permute(2, 0, 3, 4, 1).unbind(0)
    got, _ = vision_sdpa(_module(CHANNEL_ATTENTION), q, k, v, None, scaling=tokens ** -0.5)
    want, _ = sdpa_attention_forward(_module("Other"), q, k, v, None, scaling=tokens ** -0.5)
    assert got.shape == want.shape
    # as the module continues: back to [B, N, C]
    flat = lambda t: t.permute(0, 3, 2, 1).reshape(batch, tokens, channels)  # noqa: E731
    assert rel_err(flat(got), flat(want)) < 1e-5


def test_other_attention_goes_to_transformers_unchanged():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 9, 8, generator=g) for _ in range(3))
    got, _ = vision_sdpa(_module("Florence2VisionWindowAttention"), q, k, v, None, scaling=0.35)
    want, _ = sdpa_attention_forward(_module("Florence2VisionWindowAttention"), q, k, v, None, scaling=0.35)
    assert torch.equal(got, want)


def test_vision_tower_switches_and_keeps_its_output(tiny):
    model = tiny_model(0, with_diffusion=False)
    plain = copy.deepcopy(model)
    assert use_vision_attention(model) == 1 and use_vision_attention(model) == 1
    tower = model.encoder.florence.vision_tower
    assert tower.config._attn_implementation == NAME
    assert model.caption_decoder.llm.config._attn_implementation != NAME  # the tower only
    size = model.config.encoder.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model.caption_embedding(pixels), plain.caption_embedding(pixels)) < 1e-5
    assert tiny.model.encoder.florence.vision_tower.config._attn_implementation == NAME  # the engine's
    eager = tiny_model(0, with_diffusion=False)
    eager.encoder.florence.vision_tower.set_attn_implementation("eager")
    assert use_vision_attention(eager) == 0  # an explicit choice is kept
