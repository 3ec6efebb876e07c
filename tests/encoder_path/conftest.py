"""Fixtures for the encoder-path tests: the tiny model, its pixels, the Triton interpreter.

The interpreter is switched on per test (monkeypatch), never for the process.
"""

import pytest
import torch
from encoder_path_helpers import HAS_TRITON

from vlv_engine.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, with_diffusion=False)


@pytest.fixture
def pixels(model):
    size = model.config.encoder.image_size
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))  # [B, 3, 32, 32]


@pytest.fixture
def interpreter(monkeypatch):
    """CPU tensors go through the Triton kernels, run by Triton's interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install -e .[triton])")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLV_TRITON_ON_CPU", "1")


@pytest.fixture
def reference_path(monkeypatch):
    """CPU tensors take the plain-PyTorch references, whatever the caller's shell set."""
    monkeypatch.delenv("VLV_TRITON_ON_CPU", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
