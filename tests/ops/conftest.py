"""Fixtures for the op tests.

The interpreter is switched on per test (monkeypatch), never for the process: other
test directories and subprocesses see the environment they had. Whether triton was
first imported with or without TRITON_INTERPRET does not matter: the launchers pick
the kernel flavour at each launch (vlv_engine.ops._runtime.kernel) and the kernels call
only Triton builtins (test_runtime.py checks this in a fresh process).
"""

import os

import pytest

_SWITCHES = ("TRITON_INTERPRET", "VLV_TRITON_ON_CPU")


@pytest.fixture(autouse=True, scope="session")
def _environment_is_restored():
    """The rest of the suite (and its subprocesses) must see the environment it had."""
    before = {k: os.environ.get(k) for k in _SWITCHES}
    yield
    assert {k: os.environ.get(k) for k in _SWITCHES} == before


@pytest.fixture
def compiled_triton(monkeypatch):
    """CUDA tensors go through compiled kernels, not the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
