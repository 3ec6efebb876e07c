"""The encoder backend is chosen once, from declared constraints."""

import pytest
import torch
from encoder_path_helpers import HAS_TRITON

from vlv_engine.engine.encoder_select import (ENCODER_PREFERENCES, EncoderBackendUnavailable, missing_for,
                                              select_encoder_backend)

ALL = {"compile": True, "triton": True}
NONE = {"compile": False, "triton": False}


@pytest.mark.parametrize("device,dtype,available,want", [
    ("cuda", torch.float16, ALL, "triton"),
    ("cuda", torch.bfloat16, ALL, "triton"),
    ("cuda", torch.float32, {"compile": True, "triton": False}, "eager"),
    ("cpu", torch.float32, ALL, "compile"),
    ("cpu", torch.bfloat16, {"compile": True, "triton": True}, "compile"),
    ("cpu", torch.float32, NONE, "eager"),
    ("meta", torch.float32, ALL, "eager"),
])
def test_auto(device, dtype, available, want):
    choice = select_encoder_backend("auto", device=device, dtype=dtype, available=available)
    assert choice.name == want and choice.preference == "auto" and choice.reason


def test_eager_is_always_there_and_probes_nothing():
    assert select_encoder_backend("eager", device="cuda", available=NONE).name == "eager"


@pytest.mark.parametrize("name", ["compile", "triton"])
def test_explicit_unavailable_fails_with_the_reason(name):
    with pytest.raises(EncoderBackendUnavailable, match=f"encoder_backend='{name}'"):
        select_encoder_backend(name, device="cpu", available=NONE)


def test_explicit_available_is_honoured():
    assert select_encoder_backend("triton", device="cuda", available=ALL).name == "triton"


def test_unknown_preference():
    with pytest.raises(ValueError, match="unknown encoder backend 'tensorrt'"):
        select_encoder_backend("tensorrt")
    assert ENCODER_PREFERENCES == ("auto", "eager", "compile", "triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("VLV_TRITON_ON_CPU", raising=False)
    reason = missing_for("triton", "cpu", torch.float32)
    if not HAS_TRITON:
        assert "pip install 'vlv-engine[triton]'" in reason
        return
    assert "needs a CUDA device" in reason and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLV_TRITON_ON_CPU", "1")
    assert missing_for("triton", "cpu", torch.float32) is None
    assert select_encoder_backend("triton", device="cpu").name == "triton"


def test_triton_refuses_other_dtypes():
    reason = missing_for("triton", "cuda", torch.float64)
    assert reason is not None and ("float64" in reason or "needs triton" in reason)


def test_missing_for_on_this_machine_is_consistent():
    # Whatever this machine has, "auto" on a CPU picks compile exactly when compile can run.
    choice = select_encoder_backend("auto", device="cpu")
    assert (choice.name == "compile") == (missing_for("compile", "cpu") is None)
