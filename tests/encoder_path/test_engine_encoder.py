"""Engine(encoder_backend=...): chosen at construction, used by embed / caption / encode_pixels."""

import numpy as np
import pytest
import torch
from encoder_path_helpers import rel_err

from vlv_engine.engine.encoder_path import (CompiledEncoderPath, EagerEncoderPath, TritonEncoderPath,
                                            build_encoder_path)
from vlv_engine.engine.encoder_select import EncoderBackendUnavailable
from vlv_engine.testing import tiny_engine


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8) for i in range(3)]


@pytest.fixture(scope="module")
def eager():
    return tiny_engine(with_diffusion=False)


def test_default_is_eager_and_embed_goes_through_encode_pixels(eager, images):
    assert eager.encoder_backend.name == "eager"
    loaded = eager.load_images(images)
    pixels = eager.pixel_values(loaded)
    direct = eager.encode_pixels(pixels)
    assert isinstance(eager._encoder_path, EagerEncoderPath)
    with torch.no_grad():
        assert torch.equal(direct, eager.model.caption_embedding(pixels))
    assert torch.equal(eager.embed(images), direct)


def test_encode_pixels_names_bad_input(eager):
    with pytest.raises(ValueError, match=r"pixel_values must be a \[B, 3, 32, 32\] tensor, got \(2, 3, 16, 16\)"):
        eager.encode_pixels(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="got list"):
        eager.encode_pixels([1, 2])


def test_unknown_or_unavailable_backend_fails_at_construction(reference_path):
    with pytest.raises(ValueError, match="unknown encoder backend 'fast'"):
        tiny_engine(with_diffusion=False, encoder_backend="fast")
    with pytest.raises(EncoderBackendUnavailable, match="encoder_backend='triton' cannot run here"):
        tiny_engine(with_diffusion=False, encoder_backend="triton")  # a CPU, no interpreter


def test_auto_on_cpu_is_compile_built_lazily():
    engine = tiny_engine(with_diffusion=False, encoder_backend="auto")
    assert engine.encoder_backend.name in ("compile", "eager")  # eager only without a C++ compiler
    assert engine._encoder_path is None  # nothing built (nor compiled) before the first encode
    if engine.encoder_backend.name == "compile":
        path = build_encoder_path(engine.encoder_backend, engine.model, max_batch=engine.batch_size)
        assert isinstance(path, CompiledEncoderPath) and path._compiled is None and path.buckets == (1, 2, 4, 8)


@pytest.mark.slow  # dynamo traces the transformers modules: ~50 s on a busy 2-core CPU
def test_compile_backend_in_the_engine(eager, images):
    engine = tiny_engine(with_diffusion=False, encoder_backend="compile", batch_size=2)
    assert engine.encoder_backend.name == "compile"
    pixels = engine.pixel_values(engine.load_images(images))
    engine._encoder_path = CompiledEncoderPath(engine.model, max_batch=2, backend="eager")  # dynamo, no inductor
    out = engine.encode_pixels(pixels)
    assert rel_err(out, eager.encode_pixels(pixels)) < 1e-5


def test_triton_backend_in_the_engine(interpreter, eager, images):
    engine = tiny_engine(with_diffusion=False, encoder_backend="triton", batch_size=2)
    embs = engine.embed(images[:2])
    assert isinstance(engine._encoder_path, TritonEncoderPath)
    assert rel_err(embs, eager.embed(images[:2])) < 1e-5


def test_captions_follow_the_embedding(reference_path, eager, images):
    """caption() decodes what encode_pixels returns: the triton path on reference ops
    (the same numbers, fused differently) gives the eager engine's captions."""
    engine = tiny_engine(with_diffusion=False)
    engine._encoder_path = build_encoder_path("triton", engine.model, max_batch=4, cuda_graph=False)
    assert engine.caption(images, max_new_tokens=6) == eager.caption(images, max_new_tokens=6)


def test_encoder_batch_size_splits_a_batch_without_changing_embeddings():
    import torch

    from vlv_engine.engine.engine import ENCODER_PIXELS
    from vlv_engine.testing import tiny_engine

    whole = tiny_engine(with_diffusion=False)
    size = whole.config.encoder.image_size
    assert whole.encoder_batch_size == min(whole.batch_size, ENCODER_PIXELS // (size * size))
    split = tiny_engine(with_diffusion=False, encoder_batch_size=2)
    assert split.encoder_batch_size == 2
    calls = []
    split.encode_pixels(torch.zeros(1, 3, size, size))  # builds the path
    inner = split._encoder_path
    split._encoder_path = lambda x: calls.append(x.shape[0]) or inner(x)
    pixels = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(split.encode_pixels(pixels), whole.encode_pixels(pixels))  # eager: chunking changes nothing
    assert calls == [2, 2, 1]
    with pytest.raises(ValueError, match="encoder_batch_size"):
        tiny_engine(with_diffusion=False, encoder_batch_size=0)
