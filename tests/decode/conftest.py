"""Fixtures of the decode-loop tests: the tiny LLM and an EOS-prone copy of it."""

import copy

import pytest
import torch
from decode_helpers import EOS


@pytest.fixture(scope="session")
def llm():
    """The tiny engine's LLM (same seed, same weights) as transformers builds it: the engine
    fuses its projections (`fused_projections`), the decode loop is tested on HF's modules."""
    from vlv_engine.testing.tiny import tiny_model

    return tiny_model(0).caption_decoder.llm


@pytest.fixture(scope="session")
def eos_llm(llm):
    """A copy whose EOS logit is doubled (lm_head row; tied, so also the EOS embedding):
    about half the rows end within 20 tokens, at different steps."""
    model = copy.deepcopy(llm)
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] *= 2.0
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared 2-core machine an
    OpenMP thread waiting for a busy core makes each step 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
