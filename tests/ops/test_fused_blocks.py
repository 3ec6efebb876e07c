"""Fused BART encoder / query decoder / CLIP text encoder against the transformers
modules they are built from, at odd sizes (heads of 16, 13 and 7 tokens), on the Triton
kernels in the interpreter."""

import pytest
import torch
from ops_helpers import rel_err
from transformers import BartConfig, BartModel, CLIPTextConfig, CLIPTextModel

from vlv_engine.models.bottleneck import Bottleneck
from vlv_engine.ops.fused_blocks import FusedBartDecoder, FusedBartEncoder, FusedCLIPTextEncoder

D = 48  # 3 heads of 16


@pytest.fixture(scope="module")
def bart():
    torch.manual_seed(0)
    cfg = BartConfig(d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=3,
                     decoder_attention_heads=3, encoder_ffn_dim=80, decoder_ffn_dim=80, vocab_size=32,
                     max_position_embeddings=32, init_std=0.2)
    return BartModel(cfg).eval()


@pytest.mark.parametrize("path", ["interpreter", "reference_path"])
def test_bart_encoder(bart, path, request):
    request.getfixturevalue(path)
    x = torch.randn(2, 13, D)
    with torch.no_grad():
        want = bart.encoder(inputs_embeds=x).last_hidden_state
        got = FusedBartEncoder(bart.encoder)(x)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("path", ["interpreter", "reference_path"])
def test_bart_query_decoder(bart, path, request):
    request.getfixturevalue(path)
    q, states = torch.randn(2, 7, D), torch.randn(2, 13, D)
    with torch.no_grad():
        want = bart.decoder(inputs_embeds=q, encoder_hidden_states=states, use_cache=False).last_hidden_state
        got = FusedBartDecoder(bart.decoder)(q, states)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_text_encoder(interpreter, act):
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=3,
                                      intermediate_size=80, max_position_embeddings=16, vocab_size=32,
                                      hidden_act=act)).eval()
    x = torch.randn(2, 11, D)
    fused = FusedCLIPTextEncoder(te)
    with torch.no_grad():
        want = Bottleneck(te)(x)
        got = fused(x)
    assert rel_err(got, want) < 1e-5
    # Causal: a change at the last position leaves every earlier output as it was.
    x2 = x.clone()
    x2[:, -1] += torch.randn(2, D)
    with torch.no_grad():
        got2 = fused(x2)
    assert torch.equal(got2[:, :-1], got[:, :-1]) and not torch.equal(got2[:, -1], got[:, -1])
    with pytest.raises(ValueError, match="at most 16 positions, got 17"):
        fused(torch.randn(1, 17, D))
