"""vlv::layer_norm and vlv::add_layer_norm: the Triton kernel (interpreter) vs the reference."""

import pytest
import torch
from ops_helpers import max_err, rel_err

from vlv_engine import ops
from vlv_engine.ops import reference
from vlv_engine.ops.layer_norm import layer_norm_triton

# (leading shape, hidden): odd row counts and widths that are not powers of two.
SHAPES = [((5,), 77), ((123,), 96), ((2, 3), 1024)]


def _inputs(lead, n, dtype, affine=True):
    x = torch.randn(*lead, n) * 2 + 0.5  # an offset: a naive E[x^2] - E[x]^2 variance would lose digits
    r = torch.randn(*lead, n)
    w = torch.randn(n) if affine else None
    b = torch.randn(n) if affine else None
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(x), cast(r), cast(w), cast(b)


@pytest.mark.parametrize("lead,n", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fp32_matches_reference(interpreter, lead, n, with_residual):
    x, r, w, b = _inputs(lead, n, torch.float32)
    assert ops.backend_for(x) == "triton"
    if with_residual:
        y, s = ops.layer_norm(x, w, b, 1e-5, residual=r)
        y_ref, s_ref = reference.add_layer_norm(x, r, w, b, 1e-5)
        assert torch.equal(s, s_ref)  # the sum is one fp32 add either way
    else:
        y = ops.layer_norm(x, w, b, 1e-5)
        y_ref = reference.layer_norm(x, w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rel_err(y, y_ref) < 1e-5


def test_without_affine_parameters(interpreter):
    x, r, _, _ = _inputs((7,), 33, torch.float32, affine=False)
    y, s = ops.layer_norm(x, None, None, 1e-6, residual=r)
    y_ref, _ = reference.add_layer_norm(x, r, None, None, 1e-6)
    assert rel_err(y, y_ref) < 1e-5
    w = torch.randn(33)
    assert rel_err(ops.layer_norm(x, w, None, 1e-6), reference.layer_norm(x, w, None, 1e-6)) < 1e-5


def test_fp16_matches_reference(interpreter):
    # Both compute in fp32 and round once: equal up to one fp16 ulp (2^-10 relative).
    x, r, w, b = _inputs((5, 7), 96, torch.float16)
    y, s = ops.layer_norm(x, w, b, 1e-5, residual=r)
    y_ref, s_ref = reference.add_layer_norm(x, r, w, b, 1e-5)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)


def test_bf16_in_the_interpreter(interpreter):
    # The interpreter rounds fp32 -> bf16 toward zero (a GPU rounds to nearest), so the
    # stored sum and output may be one bf16 ulp (2^-7 relative) off; test_cuda.py checks
    # the GPU's rounding.
    x, r, w, b = _inputs((5,), 77, torch.bfloat16)
    y, s = ops.layer_norm(x, w, b, 1e-5, residual=r)
    y_ref, s_ref = reference.add_layer_norm(x, r, w, b, 1e-5)
    assert y.dtype == s.dtype == torch.bfloat16
    assert ((s.double() - s_ref.double()).abs() <= s_ref.double().abs() * 2**-7).all()
    assert rel_err(y, y_ref) < 2**-6


def test_strided_inputs(interpreter):
    n = 48
    wide = torch.randn(4, 5, 2 * n)
    x = wide[..., :n]  # rows of stride 2n: passed as a view
    r = torch.randn(5, 4, n).transpose(0, 1)  # rows do not collapse: copied
    w = torch.randn(2 * n)[::2]  # a strided weight
    b = torch.randn(n)
    assert not x.is_contiguous() and not r.is_contiguous() and not w.is_contiguous()
    y, s = layer_norm_triton(x, w, b, 1e-5, residual=r)
    y_ref, s_ref = reference.add_layer_norm(x, r, w, b, 1e-5)
    assert y.is_contiguous() and s.is_contiguous()
    assert max_err(s, s_ref) == 0
    assert rel_err(y, y_ref) < 1e-5


def test_empty_input(interpreter):
    x = torch.randn(0, 16)
    assert ops.layer_norm(x, torch.ones(16), None, 1e-5).shape == (0, 16)


def test_shape_errors(reference_path):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        ops.layer_norm(x, torch.ones(7), None, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        ops.layer_norm(x, None, None, 1e-5, residual=torch.randn(3, 9))


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(reference_path, affine):
    x, r, w, b = _inputs((3, 5), 16, torch.float32, affine=affine)
    torch.library.opcheck(torch.ops.vlv.layer_norm.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.vlv.add_layer_norm.default, (x, r, w, b, 1e-5))
    # A transposed input: the fake output must have the real output's (contiguous) strides.
    torch.library.opcheck(torch.ops.vlv.add_layer_norm.default, (x.transpose(0, 1), r.transpose(0, 1), w, b, 1e-5))
