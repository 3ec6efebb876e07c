"""The vision tower's GELU written over fc1's output (vlv_engine.engine.inplace_activations),
and the meta-device memory count that sizes it (vlv_engine.testing.memory_probe)."""

import copy

import pytest
import torch

from vlv_engine.engine.inplace_activations import InplaceGELU, inplace_mlp_activations
from vlv_engine.testing import tiny_model
from vlv_engine.testing.memory_probe import PeakLiveBytes, peak_bytes


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_inplace_gelu_values_and_when_it_writes_in_place(approximate):
    act = InplaceGELU(approximate)
    x = torch.randn(3, 7, 5)
    want = torch.nn.functional.gelu(x, approximate=approximate)
    with torch.no_grad():
        y = x.clone()
        out = act(y)
    assert torch.equal(out, want) and out.data_ptr() == y.data_ptr()  # over its input
    w = torch.randn(5, 5, requires_grad=True)
    h = x @ w
    out = act(h)  # a gradient needs h: the ordinary GELU
    assert out.data_ptr() != h.data_ptr() and torch.equal(out, torch.nn.functional.gelu(h, approximate=approximate))
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_vision_tower_embeddings_unchanged():
    model = tiny_model(0, with_diffusion=False)
    plain = copy.deepcopy(model)
    mlps = [m for m in model.modules() if type(m).__name__ == "Florence2VisionMLP"]
    assert mlps and inplace_mlp_activations(model) == len(mlps)
    assert inplace_mlp_activations(model) == 0  # idempotent
    size = model.config.encoder.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.caption_embedding(pixels), plain.caption_embedding(pixels))


def test_engine_uses_it(tiny):
    acts = [m.activation_fn for m in tiny.model.encoder.modules() if type(m).__name__ == "Florence2VisionMLP"]
    assert acts and all(isinstance(a, InplaceGELU) for a in acts)


def test_peak_live_bytes_counts_what_is_alive_together():
    a0 = torch.empty(10, device="meta")
    with torch.no_grad(), PeakLiveBytes(ignore=[a0]) as probe:
        a = a0 + 1  # 40 bytes
        b = a * 2  # 80 alive
        v = b[2:]  # a view: nothing new
        del a  # 40 alive
        c = torch.cat([b, b])  # 120 alive
        b.add_(1)  # in place: nothing new
        del b, v, c
    assert probe.peak == 120 and probe.live == 0


def test_inplace_gelu_lowers_the_encoder_peak():
    """The encoder's peak on the meta device, with and without the in-place GELU: the
    tiny model's fc1 output no longer has a copy beside it."""
    with torch.device("meta"):
        model = tiny_model(0, with_diffusion=False).to("meta")
    size = model.config.encoder.image_size
    pixels = torch.empty(8, 3, size, size, device="meta")
    weights = [*model.parameters(), *model.buffers()]
    before = peak_bytes(model.caption_embedding, pixels, ignore=weights)
    inplace_mlp_activations(model)
    after = peak_bytes(model.caption_embedding, pixels, ignore=weights)
    assert 0 < after < before
