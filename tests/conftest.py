import importlib.util

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny():
    """One tiny random engine (fp32, CPU) shared by read-only tests."""
    from vlv_engine.testing import tiny_engine

    return tiny_engine(seed=0)


@pytest.fixture(scope="session")
def rgb_images():
    """Six random RGB images of different sizes plus three flat ones."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8) for i in range(6)]
    images += [np.full((16, 24, 3), c, dtype=np.uint8) for c in (0, 128, 255)]
    return images


@pytest.fixture
def interpreter(monkeypatch):
    """CPU tensors go through the Triton kernels, run by Triton's interpreter. Switched on
    per test (monkeypatch), never for the process."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e .[triton])")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLV_TRITON_ON_CPU", "1")


@pytest.fixture
def reference_path(monkeypatch):
    """CPU tensors take the plain-PyTorch references, whatever the caller's shell set."""
    monkeypatch.delenv("VLV_TRITON_ON_CPU", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
