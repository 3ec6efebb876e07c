"""Fixtures for the UNet/VAE backend tests.

The ONNX exports (8-10 s each for the tiny UNet with the dynamo exporter) are shared:
one session-wide cache folder, so the engine test finds the UNet graph the runner
test exported (same weights, same contract) instead of exporting again.
"""

import copy

import pytest
import torch

from vlv_engine.engine.backends.cache import CACHE_ENV


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread while these tests run (restored after). On a shared 2-core
    machine an OpenMP team with a descheduled thread stalls every op: the tiny UNet's
    eager forward took 3 s with 2 threads under load, 15 ms with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    """$VLV_CACHE_DIR for the backend tests; the artifacts live in <root>/backends."""
    return tmp_path_factory.mktemp("vlv_cache")


@pytest.fixture(scope="session")
def cache_dir(cache_root):
    return cache_root / "backends"


@pytest.fixture
def cache_env(monkeypatch, cache_root):
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    return cache_root


@pytest.fixture(scope="session")
def tiny_decoder():
    """The tiny engine's diffusion decoder (seed 0), fp32, no coordinate channels."""
    from vlv_engine.testing import tiny_model

    return tiny_model(seed=0).diffusion


@pytest.fixture(scope="session")
def coord_decoder():
    """A tiny decoder whose UNet takes coordinate channels (x, y and one Fourier octave)."""
    from vlv_engine.config import preset
    from vlv_engine.models import DiffusionDecoder

    cfg = copy.deepcopy(preset("tiny").diffusion)
    cfg.unet["in_channels"] = 10
    cfg.coord_channels = 6
    torch.manual_seed(1)
    return DiffusionDecoder.from_config(cfg).eval()


@pytest.fixture(scope="session")
def onnx_unet(tiny_decoder, cache_dir):
    """ONNX Runtime runner of the tiny UNet, exported for the tiny engine's contract
    (Nq = 8, max_batch = 8: the engine's default batch size)."""
    from vlv_engine.engine.backends.onnx_backend import onnx_unet_runner

    return onnx_unet_runner(tiny_decoder, num_queries=8, max_batch=8, cache_dir=cache_dir, threads=1)
