"""Drop-in fused modules, and the encoder-to-bottleneck path on the tiny model."""

import pytest
import torch
from ops_helpers import rel_err
from torch import nn

from vlv_engine import ops
from vlv_engine.ops import FusedLayerNorm, FusedLinearGELU, fuse_projector
from vlv_engine.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, with_diffusion=False)


@pytest.fixture
def pixels(model):
    size = model.config.encoder.image_size
    return torch.randn(2, 3, size, size)  # [B, 3, 32, 32]


def test_fused_layer_norm_is_a_drop_in(interpreter):
    ln = nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    fused = FusedLayerNorm.from_module(ln)
    assert fused.weight is ln.weight and fused.bias is ln.bias  # shared, not copied
    assert fused.state_dict().keys() == ln.state_dict().keys()
    x, r = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    with torch.no_grad():
        assert rel_err(fused(x), ln(x)) < 1e-5
        y, s = fused(x, r)
        assert torch.equal(s, x + r) and rel_err(y, ln(x + r)) < 1e-5
    with pytest.raises(ValueError, match="last dim"):
        FusedLayerNorm.from_module(nn.LayerNorm((4, 48)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_linear_gelu_is_a_drop_in(interpreter, approximate):
    linear, gelu = nn.Linear(40, 24), nn.GELU(approximate)
    fused = FusedLinearGELU.from_modules(linear, gelu)
    assert fused.state_dict().keys() == linear.state_dict().keys()
    x = torch.randn(7, 40)
    with torch.no_grad():
        assert rel_err(fused(x), gelu(linear(x))) < 1e-5
    with pytest.raises(TypeError):
        FusedLinearGELU.from_modules(linear, nn.ReLU())


def test_fused_projector_keeps_checkpoint_keys(model):
    phi = model.encoder.language_proj
    fused = fuse_projector(phi)
    assert list(fused.state_dict()) == list(phi.state_dict())  # 0.weight, 0.bias, 2.weight, 2.bias
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), phi.state_dict().values()))


def test_tiny_model_with_fused_phi_and_final_layer_norm(interpreter, model, pixels):
    with torch.no_grad():
        expected = model.caption_embedding(pixels)  # [B, Nq, D]
    te = model.bottleneck.text_encoder
    phi, final_ln = model.encoder.language_proj, te.final_layer_norm
    calls = []
    try:
        model.encoder.language_proj = fuse_projector(phi)
        te.final_layer_norm = FusedLayerNorm.from_module(final_ln)
        for m in (model.encoder.language_proj[0], te.final_layer_norm):
            m.register_forward_hook(lambda mod, args, out: calls.append(ops.backend_for(args[0])))
        with torch.no_grad():
            got = model.caption_embedding(pixels)
    finally:
        model.encoder.language_proj, te.final_layer_norm = phi, final_ln
    assert calls == ["triton", "triton"]
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


def _attend(attn, h, kv, causal):
    """An HF attention module's projections around vlv::attention."""
    b, lq, _ = h.shape
    heads = attn.num_heads if hasattr(attn, "num_heads") else attn.config.num_attention_heads
    split = lambda t: t.view(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731  [B, H, L, D] view
    q, k, v = split(attn.q_proj(h)), split(attn.k_proj(kv)), split(attn.v_proj(kv))
    assert abs(getattr(attn, "scaling", getattr(attn, "scale", None)) - q.shape[-1] ** -0.5) < 1e-12
    o = ops.attention(q, k, v, is_causal=causal)  # [B, H, Lq, D]
    return attn.out_proj(o.transpose(1, 2).reshape(b, lq, -1))


def _mlp(fc1, fc2, act_name, h):
    assert act_name == "gelu"  # exact erf GELU in both tiny configs
    return fc2(ops.linear_gelu(h, fc1.weight, fc1.bias))


def test_encoder_path_composed_from_ops(interpreter, model, pixels):
    """The Florence query decoder, phi and the CLIP bottleneck written with the three
    ops (post-LN adds fused for BART, pre-LN adds fused for CLIP) give the model's
    caption embedding: the ops' layouts, scales and causality match the real modules."""
    enc = model.encoder
    te = model.bottleneck.text_encoder
    with torch.no_grad():
        expected = model.caption_embedding(pixels)
        states = enc.encoder_states(pixels)  # [B, T, d]

        dec = enc.florence.language_model.decoder
        b, nq = pixels.shape[0], enc.num_queries
        h = enc.query_embed.expand(b, -1, -1)  # [B, Nq, d]; inputs_embeds are not scaled
        h = h + dec.embed_positions(None, 0, position_ids=torch.arange(nq))
        ln = dec.layernorm_embedding
        h = ops.layer_norm(h, ln.weight, ln.bias, ln.eps)
        for layer in dec.layers:  # post-LN: h = LN(h + sublayer(h))
            a = _attend(layer.self_attn, h, h, causal=True)
            h, _ = ops.layer_norm(a, layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias,
                                  layer.self_attn_layer_norm.eps, residual=h)
            a = _attend(layer.encoder_attn, h, states, causal=False)
            h, _ = ops.layer_norm(a, layer.encoder_attn_layer_norm.weight, layer.encoder_attn_layer_norm.bias,
                                  layer.encoder_attn_layer_norm.eps, residual=h)
            m = _mlp(layer.fc1, layer.fc2, dec.config.activation_function, h)
            h, _ = ops.layer_norm(m, layer.final_layer_norm.weight, layer.final_layer_norm.bias,
                                  layer.final_layer_norm.eps, residual=h)

        phi = enc.language_proj
        x = phi[2](ops.linear_gelu(h, phi[0].weight, phi[0].bias))  # [B, Nq, D]

        h = te.embeddings(inputs_embeds=x)
        layers = te.encoder.layers
        first = layers[0].layer_norm1
        normed = ops.layer_norm(h, first.weight, first.bias, first.eps)
        for i, layer in enumerate(layers):  # pre-LN: each LN fused with the add before it
            a = _attend(layer.self_attn, normed, normed, causal=True)
            normed, h = ops.layer_norm(a, layer.layer_norm2.weight, layer.layer_norm2.bias, layer.layer_norm2.eps,
                                       residual=h)
            m = _mlp(layer.mlp.fc1, layer.mlp.fc2, te.config.hidden_act, normed)
            nxt = layers[i + 1].layer_norm1 if i + 1 < len(layers) else te.final_layer_norm
            normed, h = ops.layer_norm(m, nxt.weight, nxt.bias, nxt.eps, residual=h)

    assert rel_err(normed, expected) < 1e-5
