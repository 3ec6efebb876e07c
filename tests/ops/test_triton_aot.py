"""Every Triton launch of the encoder path, compiled for real GPUs on this CPU.

The interpreter tests check what the kernels compute; these check what only a GPU's
compiler decides: that each launch the launchers plan, over the range of shapes and dtypes
they accept, compiles for sm_80 (A100), sm_86 (consumer Ampere, whose 99 KB of shared
memory per block is the smallest limit) and sm_90 (H100), fits that GPU's shared memory,
spills no registers, and runs its fp16 / bf16 products on tensor cores.
(`vlv_engine.testing.triton_aot`: Triton's own compiler and ptxas, nothing runs.)
"""

import importlib.util

import pytest
import torch

from vlv_engine.ops.attention import attention_launch
from vlv_engine.ops.layer_norm import MAX_TRITON_HIDDEN, layer_norm_launch
from vlv_engine.ops.linear_gelu import linear_gelu_launch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e .[triton])")

ARCHS = (80, 86, 90)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
E = torch.empty


def _attention(dtype, lq, lk, d, causal=False):
    # [B, L, H, D] projections viewed as [B, H, L, D], as the attention modules pass them.
    q = E(2, lq, 16, d, dtype=dtype).transpose(1, 2)
    k = E(2, lk, 16, d, dtype=dtype).transpose(1, 2)
    v = E(2, lk, 16, d, dtype=dtype).transpose(1, 2)
    return attention_launch(q, k, v, E(2, 16, lq, d, dtype=dtype), causal)


def _linear_gelu(dtype, m, n=4096, k=1024):
    return linear_gelu_launch(E(m, k, dtype=dtype), E(n, k, dtype=dtype), E(n, dtype=dtype), E(m, n, dtype=dtype))


def _layer_norm(dtype, n, m=616):
    return layer_norm_launch(E(m, n, dtype=dtype), E(n, dtype=dtype), E(n, dtype=dtype), 1e-5, E(m, n, dtype=dtype),
                             E(m, n, dtype=dtype), E(m, n, dtype=dtype))


# (name, plan, uses tl.dot): the paper model's shapes (head dim 64, width 1024, MLP 4096,
# 8 images x 77 queries, ~600 image tokens) and each launcher's largest tiles.
LAUNCHES = [
    ("attention-causal-77-d64", lambda dt: _attention(dt, 77, 77, 64, True), True),
    ("attention-cross-77x600-d64", lambda dt: _attention(dt, 77, 600, 64), True),
    ("attention-77x600-d128", lambda dt: _attention(dt, 77, 600, 128), True),
    ("attention-77x600-d256", lambda dt: _attention(dt, 77, 600, 256), True),
    ("linear_gelu-616x4096x1024", lambda dt: _linear_gelu(dt, 616), True),
    ("linear_gelu-16x4096x1024", lambda dt: _linear_gelu(dt, 16), True),
    ("layer_norm-1024", lambda dt: _layer_norm(dt, 1024), False),
    (f"layer_norm-{MAX_TRITON_HIDDEN}", lambda dt: _layer_norm(dt, MAX_TRITON_HIDDEN), False),
]


@pytest.fixture
def gpu_plans(monkeypatch):
    """Launches planned as on a GPU: outside the interpreter, fp32 dots in IEEE precision
    (torch's default); whatever this process had set."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm{a}" for a in ARCHS])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("name,plan,dots", LAUNCHES, ids=[n for n, _, _ in LAUNCHES])
def test_compiles_and_fits(gpu_plans, name, plan, dots, dtype, arch):
    from vlv_engine.testing.triton_aot import compile_launch

    launch = plan(DTYPES[dtype])
    assert launch.kwargs.get("UPCAST", False) is False  # the GPU's code, not the interpreter's
    report = compile_launch(launch, arch)
    assert report.fits, f"{report.summary()}: over the shared memory of sm_{arch}"
    assert report.spill_bytes == 0, report.summary()
    if dots and dtype != "fp32":
        assert report.tensor_core_ops > 0, report.summary()
    else:  # fp32 products stay IEEE (F.linear's and SDPA's results) unless TF32 is allowed
        assert report.tensor_core_ops == 0, report.summary()


def test_tf32_when_torch_allows_it(gpu_plans):
    """With torch.backends.cuda.matmul.allow_tf32, fp32 dots go to tensor cores as
    torch's own matmuls then do."""
    from vlv_engine.testing.triton_aot import compile_launch

    torch.backends.cuda.matmul.allow_tf32 = True  # the fixture restores it
    assert compile_launch(_linear_gelu(torch.float32, 616), 80).tensor_core_ops > 0


def test_an_oversized_plan_is_caught(gpu_plans):
    """The check can fail: fp32 attention at head dim 256 with the tiles used below it
    needs more shared memory than a consumer GPU has (what the launcher now avoids)."""
    from vlv_engine.testing.triton_aot import compile_launch

    launch = _attention(torch.float32, 77, 600, 256)
    launch.kwargs.update(BLOCK_M=64, BLOCK_N=32)
    report = compile_launch(launch, 86)
    assert report.shared_bytes > report.shared_limit and not report.fits
    assert compile_launch(launch, 90).fits  # an H100 has 227 KB


def test_unknown_arch():
    from vlv_engine.testing.triton_aot import compile_launch

    with pytest.raises(ValueError, match="sm_70"):
        compile_launch(_layer_norm(torch.float32, 64), 70)
