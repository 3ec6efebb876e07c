"""Engine.reconstruct with the UNet on ONNX Runtime against the eager engine.

Tolerance: every pixel within 1 uint8 level of eager (fp32 ONNX Runtime differs from
eager by ~1e-6 relative per UNet call; after the tiny model's 4 guided steps and the
VAE, a pixel can land on the other side of a rounding boundary, never further).
"""

import numpy as np
import pytest
import torch

from vlv_engine.engine.backends import BackendUnavailable
from vlv_engine.testing import tiny_engine


def test_reconstruct_with_onnx_matches_eager(rgb_images, cache_env):
    eager = tiny_engine(seed=0)
    onnx = tiny_engine(seed=0, unet_backend="onnx")
    assert eager.unet_backend.name == "eager" and onnx.unet_backend.name == "onnx"
    images = rgb_images[:3]
    want = [np.asarray(im, dtype=np.int16) for im in eager.reconstruct(images, seed=3)]
    got = [np.asarray(im, dtype=np.int16) for im in onnx.reconstruct(images, seed=3)]
    runner = onnx.model.diffusion._unet_runner
    assert runner.backend == "onnx"
    assert runner.runner.calls == onnx.config.diffusion.num_inference_steps  # one batched CFG call per step
    assert runner.artifact.path.is_relative_to(cache_env / "backends")
    vae = onnx.model.diffusion._vae_decoder_runner  # the VAE decoder follows the UNet onto ONNX Runtime
    assert vae.backend == "onnx" and vae.runner.calls == 1 and vae.artifact.path != runner.artifact.path
    diff = max(np.abs(a - b).max() for a, b in zip(got, want))
    assert diff <= 1
    # eager engines leave the decoder on its eager path
    eager.reconstruct(images[:1])
    assert eager.model.diffusion._unet_runner is None and eager.model.diffusion._vae_decoder_runner is None


def test_engine_takes_a_runner_object(rgb_images):
    calls = []

    def runner(latents, t, context):
        calls.append(tuple(latents.shape))
        return latents * 0

    custom = tiny_engine(seed=0, unet_backend=runner)
    assert custom.unet_backend.name == "custom"
    custom.reconstruct(rgb_images[:2], steps=2)
    assert calls == [(4, 4, 8, 8)] * 2  # 2 images, guidance: one batch of 4 per step


def test_engine_refuses_unknown_or_unavailable_backends():
    with pytest.raises(ValueError, match="unknown UNet backend"):
        tiny_engine(seed=0, unet_backend="fast")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        tiny_engine(seed=0, unet_backend="tensorrt")


def test_vae_decoder_runner_replaces_the_eager_decode(rgb_images):
    engine = tiny_engine(seed=0)
    diffusion = engine.model.diffusion
    latents = diffusion.encode(engine.pixel_values(engine.load_images(rgb_images[:2])) * 2 - 1, sample=False)
    want = diffusion.decode(latents)
    seen = []

    def runner(unscaled):
        seen.append(unscaled)
        return diffusion.vae.decode(unscaled).sample * 0 - 1  # all black: clearly not the eager result

    diffusion.set_vae_decoder_backend(runner)
    try:
        got = diffusion.decode(latents)
    finally:
        diffusion.set_vae_decoder_backend(None)
    assert torch.allclose(seen[0], latents / diffusion.scaling_factor)  # the runner gets unscaled latents
    assert torch.equal(got, torch.zeros_like(got)) and not torch.equal(want, got)
    assert torch.equal(diffusion.decode(latents), want)  # None restores eager
