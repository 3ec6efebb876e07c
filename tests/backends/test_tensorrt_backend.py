"""TensorRT up to the engine build: no TensorRT here (it cannot be installed on these
machines), so the build is checked against a recording stand-in of the `tensorrt`
module, and the binding-shape logic against ONNX Runtime as the runtime."""

import sys
import types

import pytest
import torch
from conftest import rel_err

from vlv_engine.config import preset
from vlv_engine.engine.backends import cache
from vlv_engine.engine.backends import tensorrt_backend as tb
from vlv_engine.engine.backends.contract import ContractError, unet_contract


@pytest.fixture
def contract():
    return unet_contract(preset("nano").diffusion.unet, coord_channels=14, num_queries=16, max_batch=4)


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def _parts(contract, **over):
    kw = dict(onnx_key="a" * 64, options=tb.BuildOptions(), trt_version="10.9.0", gpu="NVIDIA H200 sm90")
    kw.update(over)
    return tb.tensorrt_cache_parts(kw["onnx_key"], contract, kw["options"], trt_version=kw["trt_version"],
                                   gpu=kw["gpu"])


def test_missing_tensorrt_raises_a_clear_error(no_tensorrt):
    with pytest.raises(tb.TensorRTUnavailable, match=r"TensorRT is not installed: pip install tensorrt on a CUDA "
                                                     r"machine"):
        tb.import_tensorrt()
    assert not tb.tensorrt_available()
    assert isinstance(tb.TensorRTUnavailable("x"), ImportError)


def test_runner_fails_before_any_export_when_tensorrt_is_missing(no_tensorrt, tiny_decoder, monkeypatch, tmp_path):
    from vlv_engine.engine.backends import onnx_backend

    monkeypatch.setattr(onnx_backend, "ensure_onnx", lambda *a, **k: pytest.fail("exported without TensorRT"))
    with pytest.raises(tb.TensorRTUnavailable, match="TensorRT is not installed"):
        tb.tensorrt_unet_runner(tiny_decoder, num_queries=8, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_importing_the_backend_does_not_import_tensorrt():
    import subprocess

    code = ("import sys, vlv_engine.engine.backends.tensorrt_backend, vlv_engine.engine.backends.select; "
            "print([m for m in ('tensorrt', 'onnxruntime', 'onnx') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_profile_comes_from_the_contract(contract):
    assert tb.profile_shapes(contract) == [
        ("sample", (1, 4, 16, 16), (2, 4, 16, 16), (8, 4, 16, 16)),
        ("timestep", (1,), (2,), (8,)),
        ("encoder_hidden_states", (1, 16, 64), (2, 16, 64), (8, 16, 64)),
    ]


def test_engine_cache_key_changes_with_every_component(contract):
    key = cache.key_of(_parts(contract))
    assert cache.key_of(_parts(contract)) == key
    other_contract = unet_contract(preset("nano").diffusion.unet, coord_channels=14, num_queries=16, max_batch=8)
    variants = [
        _parts(contract, onnx_key="b" * 64),  # weights / config / contract / opset / torch (via the ONNX key)
        _parts(contract, trt_version="10.10.0"),
        _parts(contract, gpu="NVIDIA A100-SXM4-80GB sm80"),
        _parts(other_contract),  # profile
        _parts(contract, options=tb.BuildOptions(precision="bf16")),
        _parts(contract, options=tb.BuildOptions(optimization_level=5)),
        _parts(contract, options=tb.BuildOptions(int8=True)),
    ]
    keys = {cache.key_of(p) for p in variants}
    assert key not in keys and len(keys) == len(variants)
    # CUDA-graph replay is a runtime choice: the same engine serves both
    assert cache.key_of(_parts(contract, options=tb.BuildOptions(cuda_graph=True))) == key


def test_build_options_are_checked_against_the_gpu_and_graph():
    tb.check_build_options(tb.BuildOptions("bf16"), compute_capability=(8, 0), qdq_nodes=0)
    with pytest.raises(ValueError, match="bf16 engines need compute capability >= 8.0"):
        tb.check_build_options(tb.BuildOptions("bf16"), compute_capability=(7, 5), qdq_nodes=0)
    with pytest.raises(ValueError, match="fp8 needs compute capability >= 8.9"):
        tb.check_build_options(tb.BuildOptions(fp8=True), compute_capability=(8, 0), qdq_nodes=10)
    with pytest.raises(ValueError, match="explicitly quantized graph"):
        tb.check_build_options(tb.BuildOptions(int8=True), compute_capability=(9, 0), qdq_nodes=0)
    tb.check_build_options(tb.BuildOptions(fp8=True), compute_capability=(9, 0), qdq_nodes=10)
    with pytest.raises(ValueError, match="precision"):
        tb.BuildOptions("int4")
    assert [tb.precision_for(d) for d in (torch.float16, torch.bfloat16, torch.float32)] == ["fp16", "bf16", "tf32"]


def test_exported_unet_graph_has_no_qdq_nodes(onnx_unet):
    assert tb.count_qdq_nodes(onnx_unet.runner.path) == 0


# ------------------------------------------------------------------ build against a stand-in


class _Recorder:
    def __init__(self):
        self.calls = []


def fake_tensorrt(rec: _Recorder, input_names, build_ok=True):
    """Just enough of the TensorRT 10 Python API for build_engine, recording each call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0-fake"
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", BF16="BF16", FP8="FP8", INT8="INT8", TF32="TF32")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        num_inputs = len(input_names)

        def get_input(self, i):
            return Tensor(input_names[i])

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.calls.append(("parse", path))
            return True

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec.calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Config:
        builder_optimization_level = None

        def set_flag(self, flag):
            rec.calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            rec.calls.append(("clear_flag", flag))

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("workspace", size))

        def add_optimization_profile(self, profile):
            rec.calls.append(("add_profile",))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build", config.builder_optimization_level))
            return b"engine-bytes" if build_ok else None

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, Parser
    return trt


def test_build_engine_sets_profile_and_flags_from_contract_and_options(contract, monkeypatch, tmp_path):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec, contract.input_names))
    opts = tb.BuildOptions(precision="fp16", int8=True, workspace_gib=2, optimization_level=4)
    out = tb.build_engine(tmp_path / "m.onnx", contract, opts, tmp_path / "m.plan")
    assert out.read_bytes() == b"engine-bytes"
    shapes = [c[1:] for c in rec.calls if c[0] == "set_shape"]
    assert shapes == tb.profile_shapes(contract)
    assert ("set_flag", "FP16") in rec.calls and ("set_flag", "INT8") in rec.calls
    assert ("set_flag", "BF16") not in rec.calls
    assert ("workspace", 2 << 30) in rec.calls and ("build", 4) in rec.calls
    assert rec.calls.index(("add_profile",)) < rec.calls.index(("build", 4))


def test_build_engine_refuses_a_graph_with_other_inputs_and_a_failed_build(contract, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(_Recorder(), ["sample", "t", "ctx"]))
    with pytest.raises(ContractError, match="contract inputs"):
        tb.build_engine(tmp_path / "m.onnx", contract, tb.BuildOptions(), tmp_path / "m.plan")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(_Recorder(), contract.input_names, build_ok=False))
    with pytest.raises(RuntimeError, match="failed to build"):
        tb.build_engine(tmp_path / "m.onnx", contract, tb.BuildOptions("fp32"), tmp_path / "m.plan")


# ------------------------------------------------------------------ binding shapes, ONNX Runtime as the runtime


class OrtAsEngine:
    """TensorRTEngine's run() contract (profile range enforced) on ONNX Runtime."""

    def __init__(self, onnx_runner, contract):
        self.runner, self.contract, self.batches = onnx_runner, contract, []

    def run(self, inputs):
        sizes = self.contract.bind_tensors(inputs, check_range=True)
        self.batches.append(sizes["batch"])
        outs = self.runner.run(inputs)
        assert {k: tuple(v.shape) for k, v in outs.items()} == self.contract.output_shapes(sizes)
        return outs


def test_tensorrt_runner_chunks_batches_over_the_profile_max(onnx_unet, tiny_decoder):
    small = unet_contract(tiny_decoder.unet.config, coord_channels=0, num_queries=8, max_batch=2)  # batch <= 4
    engine = OrtAsEngine(onnx_unet.runner, small)
    runner = tb.TensorRTUNetRunner(engine)
    latents, context = torch.randn(10, 4, 8, 8), torch.randn(10, 8, 32)
    with torch.no_grad():
        ref = tiny_decoder.predict_noise(latents, torch.tensor(300), context)
    out = runner(latents, torch.tensor(300), context)
    assert engine.batches == [4, 4, 2]
    assert rel_err(out, ref) < 1e-4
    with pytest.raises(ContractError, match="outside the range"):
        engine.run(small.sample_inputs({"batch": 5}))
