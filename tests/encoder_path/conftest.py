"""Fixtures for the encoder-path tests: the tiny model and its pixels (the Triton
interpreter fixtures are in tests/conftest.py)."""

import pytest
import torch

from vlv_engine.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, with_diffusion=False)


@pytest.fixture
def pixels(model):
    size = model.config.encoder.image_size
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))  # [B, 3, 32, 32]
