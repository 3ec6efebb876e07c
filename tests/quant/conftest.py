"""Fixtures of the quantization tests."""

import pytest
import torch
from quant_helpers import trained_llm


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny matrices gain nothing from two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained():
    """(llm, prefixes [32, 8, 64], sequences [32, 12]) of a tiny LLM trained to decode them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trained_llm()
    finally:
        torch.set_num_threads(before)
