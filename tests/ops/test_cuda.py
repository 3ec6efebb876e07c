"""The compiled kernels on a GPU, at the path's real sizes (CLIP-H / Florence-large).

Skipped without CUDA. These check what Triton's CPU interpreter does not model:
tensor-core fp16/bf16 dots, the GPU's round-to-nearest bf16 stores, IEEE fp32 dots,
and torch.compile tracing through the custom ops.
"""

import pytest
import torch
from ops_helpers import max_err, needs_cuda, rel_err

from vlv_engine import ops
from vlv_engine.ops import reference

pytestmark = [needs_cuda, pytest.mark.usefixtures("compiled_triton")]
HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_layer_norm(dtype):
    x, r = (torch.randn(8, 77, 1024, device="cuda", dtype=dtype) for _ in range(2))
    w, b = (torch.randn(1024, device="cuda", dtype=dtype) for _ in range(2))
    assert ops.backend_for(x) == "triton"
    y, s = ops.layer_norm(x, w, b, 1e-5, residual=r)
    y_ref, s_ref = reference.add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(s, s_ref)  # one add, rounded to nearest, either way
    if dtype == torch.float32:
        assert rel_err(y, y_ref) < 1e-5
    else:  # both round an fp32 result once: one ulp apart at most
        ulp = 2**-10 if dtype == torch.float16 else 2**-7
        torch.testing.assert_close(y, y_ref, atol=4 * ulp, rtol=ulp)


@pytest.mark.parametrize("dtype,approximate",
                         [(torch.float32, "none"), (torch.float16, "none"), (torch.bfloat16, "none"),
                          (torch.bfloat16, "tanh"), (torch.float32, "quick"), (torch.bfloat16, "quick")])
def test_linear_gelu(dtype, approximate):
    x = torch.randn(8 * 77, 1024, device="cuda").to(dtype)
    w = (torch.randn(1024, 1024, device="cuda") / 32).to(dtype)
    b = torch.randn(1024, device="cuda").to(dtype)
    y = ops.linear_gelu(x, w, b, approximate)
    exact = reference.linear_gelu(x.double(), w.double(), b.double(), approximate)
    if dtype == torch.float32:  # IEEE dot unless torch allows TF32
        assert not torch.backends.cuda.matmul.allow_tf32
        assert rel_err(y, exact) < 1e-5
    else:
        assert max_err(y, exact) <= 2 * max_err(reference.linear_gelu(x, w, b, approximate), exact)


CLIP, FLORENCE = (8, 16, 77, 77, 64, True), (8, 16, 77, 600, 64, False)
ATTENTION = [(dtype, case) for dtype in (torch.float32, *HALF) for case in (CLIP, FLORENCE)]
ATTENTION += [(torch.bfloat16, (4, 8, 77, 577, 128, False))]


@pytest.mark.parametrize("dtype,case", ATTENTION)
def test_attention(dtype, case):
    b, h, lq, lk, d, causal = case
    q = torch.randn(b, lq, h, d, device="cuda", dtype=dtype).transpose(1, 2)  # [B, H, L, D] view
    k, v = (torch.randn(b, h, lk, d, device="cuda", dtype=dtype) for _ in range(2))
    out = ops.attention(q, k, v, causal)
    oracle = reference.attention(q.double(), k.double(), v.double(), causal)
    same_dtype = reference.attention(q, k, v, causal)
    slack = 2.0**-23 if dtype == torch.float32 else 0.0
    assert max_err(out, oracle) <= 2 * max_err(same_dtype, oracle) + slack


def test_torch_compile_traces_the_custom_ops():
    def block(x, r, w, b, wl, bl):
        y, s = ops.layer_norm(x, w, b, 1e-5, residual=r)
        h = ops.linear_gelu(y, wl, bl)  # [B, L, 4D]
        q = h[..., :64].reshape(2, 77, 2, 32).transpose(1, 2)  # [B, 2, L, 32]
        return ops.attention(q, q, q, True), s

    args = [torch.randn(2, 77, 64, device="cuda"), torch.randn(2, 77, 64, device="cuda"),
            torch.randn(64, device="cuda"), torch.randn(64, device="cuda"),
            torch.randn(256, 64, device="cuda") / 8, torch.randn(256, device="cuda")]
    eager = block(*args)
    compiled = torch.compile(block, fullgraph=True)(*args)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
