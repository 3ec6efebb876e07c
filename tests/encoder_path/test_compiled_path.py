"""torch.compile of the encoder path: lazy, one graph per batch bucket (or one dynamic
graph), same embeddings as eager.

The fast tests compile with a counting backend (dynamo traces; the graph runs as
traced): they check when and how often the path compiles. The inductor tests (C++
code generation, tens of seconds) are marked slow.
"""

import pytest
import torch
from torch import nn
from encoder_path_helpers import rel_err, same_state, snapshot

from vlv_engine.engine.encoder_path import CompiledEncoderPath


class CountingBackend:
    """A torch.compile backend that records the batch size of each graph it is given."""

    def __init__(self):
        self.batches = []

    def __call__(self, gm, example_inputs):
        # Parameters are inputs too: the pixels are the [b, 3, S, S] one (S > 7, the conv kernel).
        pixels = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == 3
                  and t.shape[-1] > 7]
        self.batches.append(pixels[0].shape[0] if pixels else None)
        return gm.forward


class StandIn(nn.Module):
    """A model with `caption_embedding` ([B, 3, S, S] -> [B, Nq, D]) that dynamo traces in
    a second: the bucketing bookkeeping, without tracing transformers' modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)
        self.proj = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))

    def caption_embedding(self, pixel_values):
        return self.proj(self.conv(pixel_values).flatten(2).transpose(1, 2))  # [B, 64, 16]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def stand_in():
    torch.manual_seed(0)
    return StandIn().eval()


@pytest.mark.parametrize("which", ["stand_in", pytest.param("model", marks=pytest.mark.slow)])
def test_buckets_compile_once_per_bucket_and_lazily(which, request, pixels):
    model = request.getfixturevalue(which)
    counter = CountingBackend()
    path = CompiledEncoderPath(model, max_batch=4, backend=counter)
    assert counter.batches == []  # nothing compiled at construction
    x = torch.cat([pixels, pixels.flip(0)])  # [6, 3, S, S]
    with torch.no_grad():
        expected = model.caption_embedding(x)
    for n in (1, 3, 2, 4, 3, 1):
        out = path(x[:n])
        assert out.shape == expected[:n].shape
        assert rel_err(out, expected[:n]) < 1e-5
    assert sorted(counter.batches) == [1, 2, 4]  # 3 went into bucket 4, twice, compiled once
    out = path(x)  # 6 > max_batch: chunks of 4 and 2, both buckets already compiled
    assert rel_err(out, expected) < 1e-5 and sorted(counter.batches) == [1, 2, 4]


@pytest.mark.parametrize("which", ["stand_in", pytest.param("model", marks=pytest.mark.slow)])
def test_dynamic_batch_compiles_once_for_many_sizes(which, request, pixels):
    model = request.getfixturevalue(which)
    counter = CountingBackend()
    path = CompiledEncoderPath(model, max_batch=8, batching="dynamic", backend=counter)
    x = torch.cat([pixels, pixels, pixels])  # [9, ...]
    with torch.no_grad():
        expected = model.caption_embedding(x)
    for n in (2, 3, 5, 7):
        assert rel_err(path(x[:n]), expected[:n]) < 1e-5
    assert len(counter.batches) == 1  # one graph, symbolic in the batch
    assert not hasattr(x, "_dynamo_dynamic_indices")


def test_rejects_unknown_batching(model):
    with pytest.raises(ValueError, match="unknown batching 'pad'"):
        CompiledEncoderPath(model, batching="pad")


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["buckets", "dynamic"])
def test_inductor_matches_eager_and_is_batch_invariant(model, pixels, batching):
    before = snapshot(model)
    path = CompiledEncoderPath(model, max_batch=4, batching=batching)
    with torch.no_grad():
        expected = model.caption_embedding(pixels)
    together = path(pixels)
    assert rel_err(together, expected) < 1e-5
    for i in range(pixels.shape[0]):
        # Batch 1 runs its own graph (dynamic: batch 1 is specialized): equal to rounding.
        assert rel_err(path(pixels[i:i + 1])[0], together[i]) < 1e-5
    assert same_state(model, before)
