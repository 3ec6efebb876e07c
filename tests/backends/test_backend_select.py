"""Choosing the UNet backend from declared constraints (availability injected: no real CUDA)."""

import pytest
import torch

from vlv_engine.engine.backends import select as sel
from vlv_engine.engine.backends.tensorrt_backend import TensorRTUnavailable

ALL = {"eager": True, "onnx": True, "tensorrt": True, "compile": True}
NONE = {"eager": True, "onnx": False, "tensorrt": False, "compile": False}


def avail(**over):
    return {**NONE, **over}


@pytest.mark.parametrize("device, dtype, available, want", [
    ("cuda", torch.float16, ALL, "tensorrt"),
    ("cuda", torch.bfloat16, avail(tensorrt=True), "tensorrt"),
    ("cuda:1", torch.float32, avail(onnx=True, compile=True), "compile"),
    ("cuda", torch.float16, avail(onnx=True), "eager"),
    ("cuda", torch.float16, NONE, "eager"),
    ("cpu", torch.float32, ALL, "onnx"),
    ("cpu", torch.float32, avail(onnx=True), "onnx"),
    ("cpu", torch.float32, avail(compile=True), "eager"),
    ("cpu", torch.bfloat16, ALL, "eager"),
    ("cpu", torch.float16, ALL, "eager"),
    ("meta", torch.float32, ALL, "eager"),
])
def test_auto_choice(device, dtype, available, want):
    choice = sel.select_backend("auto", device=device, dtype=dtype, available=available)
    assert choice.name == want and choice.reason and choice.preference == "auto"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ["eager", "onnx", "compile"])
def test_explicit_choice_is_honoured_when_available(device, name):
    assert sel.select_backend(name, device=device, available=ALL).name == name


def test_eager_is_always_available():
    assert sel.select_backend("eager", device="cuda", available={}).name == "eager"
    assert sel.select_backend("auto", device="cpu", available={}).name == "eager"


def test_explicit_choice_is_refused_with_the_reason_never_swapped():
    with pytest.raises(sel.BackendUnavailable, match="needs a CUDA device"):
        sel.select_backend("tensorrt", device="cpu", available=ALL)
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        sel.select_backend("tensorrt", device="cuda", available=avail(compile=True))
    with pytest.raises(sel.BackendUnavailable, match=r"pip install 'vlv-engine\[onnx\]'"):
        sel.select_backend("onnx", device="cpu", available=NONE)
    with pytest.raises(sel.BackendUnavailable, match="torch.compile"):
        sel.select_backend("compile", device="cuda", available=NONE)
    with pytest.raises(ValueError, match="unknown UNet backend 'trt'"):
        sel.select_backend("trt")


def test_probe_on_this_machine():
    cpu = sel.probe_availability("cpu")
    assert cpu["eager"] and cpu["onnx"] and cpu["compile"]  # the dev extra installs onnx + onnxruntime
    assert not cpu["tensorrt"]  # never on a CPU device
    assert sel.select_backend("auto", device="cpu").name == "onnx"


def test_eager_runner_equals_predict_noise(tiny_decoder):
    runner = sel.build_unet_runner("eager", tiny_decoder, num_queries=8)
    assert isinstance(runner, sel.UNetRunner)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 32)
    with torch.no_grad():
        ref = tiny_decoder.predict_noise(latents, torch.tensor(17), context)
    assert torch.equal(runner(latents, torch.tensor(17), context), ref)  # int 0-d t == float [B] t


def test_decoder_uses_the_runner_and_keeps_its_state_dict(tiny_decoder):
    calls = []

    def runner(latents, t, context):
        calls.append(latents.shape)
        return torch.zeros_like(latents)

    keys = set(tiny_decoder.state_dict())
    tiny_decoder.set_unet_backend(runner)
    try:
        out = tiny_decoder.predict_noise(torch.randn(2, 4, 8, 8), torch.tensor(3), torch.randn(2, 8, 32))
        assert calls == [(2, 4, 8, 8)] and not out.any()
        assert set(tiny_decoder.state_dict()) == keys
    finally:
        tiny_decoder.set_unet_backend(None)
    assert tiny_decoder._unet_runner is None
