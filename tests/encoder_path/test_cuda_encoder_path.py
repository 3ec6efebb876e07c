"""The Triton encoder path on a GPU: compiled kernels, CUDA-graph replay, the engine's choice.

Skipped without CUDA and triton. What the CPU twins (test_fused_path.py,
test_segment_graph.py) cannot show: the kernels compiled for the GPU inside the real
path, graph capture of the phi -> text encoder segment (side-stream warm-up, static
buffers, replay with new inputs), and "auto" choosing triton on CUDA.
"""

import copy

import pytest
import torch
from encoder_path_helpers import HAS_CUDA, HAS_TRITON, rel_err, same_state, snapshot

from vlv_engine.engine.encoder_path import FusedEncoderPath, TritonEncoderPath
from vlv_engine.engine.segment_graph import CUDAGraphRecording
from vlv_engine.testing import tiny_engine, tiny_model

pytestmark = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TRITON),
    reason="needs a CUDA GPU and triton: compiled kernels and CUDA graphs do not exist on a CPU")


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CUDA tensors: compiled kernels, not the interpreter


@pytest.fixture(scope="module")
def cuda_model():
    return tiny_model(seed=0, with_diffusion=False).cuda()


def _pixels(model, b, seed=0, dtype=torch.float32):
    size = model.config.encoder.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g).to("cuda", dtype)


def test_fused_path_matches_eager_fp32(cuda_model):
    assert not torch.backends.cuda.matmul.allow_tf32  # IEEE fp32 matmuls on both sides
    before = snapshot(cuda_model)
    x = _pixels(cuda_model, 3)
    with torch.no_grad():
        expected = cuda_model.caption_embedding(x)
        got = FusedEncoderPath(cuda_model).eval()(x)
    assert rel_err(got, expected) < 1e-5
    assert same_state(cuda_model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_path_half(cuda_model, dtype):
    half = copy.deepcopy(cuda_model).to(dtype)
    x = _pixels(cuda_model, 2)
    with torch.no_grad():
        oracle = cuda_model.caption_embedding(x)
        eager_half = half.caption_embedding(x.to(dtype))
        got = FusedEncoderPath(half).eval()(x.to(dtype))
    ulp = 2**-10 if dtype == torch.float16 else 2**-7
    err = (got.double() - oracle.double()).abs().max().item()
    assert err <= 2 * (eager_half.double() - oracle.double()).abs().max().item() + ulp * oracle.abs().max().item()


@pytest.mark.parametrize("scope", ["segment", "full"])
def test_cuda_graph_replay_per_bucket(cuda_model, scope):
    runner = TritonEncoderPath(cuda_model, max_batch=4, graph_scope=scope)
    fused = runner.fused
    for b, seed in ((1, 0), (3, 1), (4, 2), (3, 3), (1, 4), (6, 5)):  # 6: chunks of 4 and 2
        x = _pixels(cuda_model, b, seed)
        with torch.no_grad():
            want = fused(x)  # the same modules without graphs
        got = runner(x)
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5, f"batch {b}"
    recs = runner._segments.recordings
    assert sorted(recs) == [1, 2, 4] and all(isinstance(r, CUDAGraphRecording) for r in recs.values())


def test_graph_output_is_not_overwritten_by_the_next_call(cuda_model):
    runner = TritonEncoderPath(cuda_model, max_batch=2)
    a = runner(_pixels(cuda_model, 2, 0))
    kept = a.clone()
    runner(_pixels(cuda_model, 2, 1))
    assert torch.equal(a, kept)


def test_engine_auto_picks_triton_on_cuda():
    fast = tiny_engine(with_diffusion=False, device="cuda", encoder_backend="auto")
    ref = tiny_engine(with_diffusion=False, device="cuda")
    assert fast.encoder_backend.name == "triton"
    x = _pixels(fast.model, 3)
    assert rel_err(fast.encode_pixels(x), ref.encode_pixels(x)) < 1e-5
    assert isinstance(fast._encoder_path, TritonEncoderPath)


def test_torch_compile_traces_the_fused_segment(cuda_model):
    fused = FusedEncoderPath(cuda_model).eval()
    with torch.no_grad():
        q = fused.query_states(_pixels(cuda_model, 2))
        eager = fused.segment(q)
        compiled = torch.compile(fused.segment, fullgraph=True)(q)
    assert rel_err(compiled, eager) < 1e-5
