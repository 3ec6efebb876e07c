import pytest
import torch

pytest.importorskip("fastapi", reason="the service needs the [serve] extra (in [dev])")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny model's ops are too small to gain from a thread team, and on a busy
    # machine a team with a descheduled thread stalls every op. Per module, not per
    # test: the service's model thread lives as long as a module's client, and toggling
    # the count under it left it running with two threads (many times slower here).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def engine():
    """One tiny random caption engine (no diffusion decoder), shared read-only."""
    from vlv_engine.testing import tiny_engine

    return tiny_engine(seed=0, with_diffusion=False)
