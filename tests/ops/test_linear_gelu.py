"""vlv::linear_gelu: the Triton kernel (interpreter) vs the reference."""

import pytest
import torch
from ops_helpers import max_err, rel_err

from vlv_engine import ops
from vlv_engine.ops import reference
from vlv_engine.ops.linear_gelu import linear_gelu_triton

# (leading shape of x, in_features, out_features): odd sizes, tails in every tile dim.
SHAPES = [((5,), 77, 96), ((123,), 96, 77), ((2, 7), 64, 130)]


def _inputs(lead, k, n, dtype, bias=True):
    x = torch.randn(*lead, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64) / k**0.5  # pre-activations of order 1: both GELU regimes
    b = torch.randn(n, dtype=torch.float64) if bias else None
    return x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None


@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
def test_fp32_matches_reference(interpreter, lead, k, n, approximate):
    x, w, b = _inputs(lead, k, n, torch.float32)
    assert ops.backend_for(x) == "triton"
    y = ops.linear_gelu(x, w, b, approximate)
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    assert rel_err(y, reference.linear_gelu(x, w, b, approximate)) < 1e-5


def test_quick_gelu_reference_is_clip_quick_gelu(reference_path):
    """'quick' is transformers' QuickGELUActivation (CLIP-L's text encoder)."""
    from transformers.activations import ACT2FN

    x, w, b = _inputs((6,), 33, 20, torch.float32)
    assert torch.equal(ops.linear_gelu(x, w, b, "quick"), ACT2FN["quick_gelu"](torch.nn.functional.linear(x, w, b)))


def test_without_bias(interpreter):
    x, w, _ = _inputs((9,), 40, 24, torch.float32, bias=False)
    assert rel_err(ops.linear_gelu(x, w, None), reference.linear_gelu(x, w, None)) < 1e-5


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fp16(interpreter, approximate):
    # fp32 accumulation and one rounding at the end: within 1e-3 of the fp64 result
    # (one fp16 ulp is 2^-10), and no worse than PyTorch's own fp16 path.
    x, w, b = _inputs((2, 9), 96, 77, torch.float16)
    y = ops.linear_gelu(x, w, b, approximate)
    exact = reference.linear_gelu(x.double(), w.double(), b.double(), approximate)
    torch_fp16 = reference.linear_gelu(x, w, b, approximate)
    assert y.dtype == torch.float16
    assert rel_err(y, exact) < 1e-3
    assert max_err(y, exact) <= max_err(torch_fp16, exact)


def test_bf16_in_the_interpreter(interpreter):
    # The interpreter computes the bf16 dot in fp32 (the kernel upcasts there) and rounds
    # the output toward zero: within two bf16 ulps (2^-7 relative) of the fp64 result.
    x, w, b = _inputs((5,), 77, 96, torch.bfloat16)
    y = ops.linear_gelu(x, w, b)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference.linear_gelu(x.double(), w.double(), b.double())) < 2**-6


def test_strided_inputs(interpreter):
    k, n = 40, 56
    x = torch.randn(k, 11).t()  # column-major x: passed with its strides
    w = torch.randn(k, n).t() / k**0.5  # weight stored transposed ([in, out] memory)
    b = torch.randn(2 * n)[1::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    y = linear_gelu_triton(x, w, b)
    assert y.is_contiguous()
    assert rel_err(y, reference.linear_gelu(x, w, b)) < 1e-5
    x3 = torch.randn(3, 4, 2 * k)[..., ::2]  # unit stride lost: copied
    assert rel_err(linear_gelu_triton(x3, w, b), reference.linear_gelu(x3, w, b)) < 1e-5


def test_errors(reference_path):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        ops.linear_gelu(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="approximate"):
        ops.linear_gelu(x, torch.randn(4, 8), None, "sigmoid")


def test_opcheck(reference_path):
    x, w, b = _inputs((3, 5), 16, 24, torch.float32)
    for args in [(x, w, b, "none"), (x, w, None, "tanh"), (x, w, b, "quick"),
                 (x.transpose(0, 1), w.t().contiguous().t(), b, "none")]:
        torch.library.opcheck(torch.ops.vlv.linear_gelu.default, args)
