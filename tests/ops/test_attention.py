"""vlv::attention: the Triton kernel (interpreter) vs the reference.

Accuracy follows FlashAttention's criterion: against an fp64 oracle, the kernel's max
error is at most twice the max error of the plain PyTorch computation in the same
dtype (fp32 adds one fp32 ulp at 1.0, 2^-23, so that rounding noise in 7-token cases,
where PyTorch's own error can be ~1e-7, does not decide the test).
"""

import pytest
import torch
import torch.nn.functional as F
from ops_helpers import max_err

from vlv_engine import ops
from vlv_engine.ops import reference
from vlv_engine.ops.attention import attention_triton

# (B, H, Lq, Lk, D, causal): CLIP self-attention (L 7 and 77, causal) and the Florence
# decoder's cross-attention (queries over 65 and 600 keys); head dims 32..200 incl. 80.
CASES = [
    (2, 3, 77, 77, 64, True),
    (1, 2, 7, 7, 32, True),
    (2, 2, 77, 65, 128, False),
    (1, 3, 7, 65, 80, False),
    (1, 1, 7, 600, 64, False),
    (1, 1, 40, 40, 200, True),  # D > 128 in fp32: the smaller tiles that fit a consumer GPU
]
IDS = [f"b{b}h{h}q{lq}k{lk}d{d}{'-causal' if c else ''}" for b, h, lq, lk, d, c in CASES]
SLACK = {torch.float32: 2.0**-23, torch.float16: 0.0, torch.bfloat16: 0.0}


def _qkv(b, h, lq, lk, d, dtype):
    return (torch.randn(b, h, lq, d).to(dtype), torch.randn(b, h, lk, d).to(dtype), torch.randn(b, h, lk, d).to(dtype))


def _assert_flash_criterion(out, q, k, v, causal, scale=None):
    oracle = reference.attention(q.double(), k.double(), v.double(), causal, scale)
    same_dtype = reference.attention(q, k, v, causal, scale)
    assert out.dtype == q.dtype and out.shape == oracle.shape
    assert max_err(out, oracle) <= 2 * max_err(same_dtype, oracle) + SLACK[q.dtype]


@pytest.mark.parametrize("b,h,lq,lk,d,causal", CASES, ids=IDS)
def test_fp32(interpreter, b, h, lq, lk, d, causal):
    q, k, v = _qkv(b, h, lq, lk, d, torch.float32)
    assert ops.backend_for(q) == "triton"
    _assert_flash_criterion(ops.attention(q, k, v, causal), q, k, v, causal)


@pytest.mark.parametrize("b,h,lq,lk,d,causal", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half(interpreter, b, h, lq, lk, d, causal, dtype):
    # bf16 here is the interpreter's emulation (fp32 dots, outputs rounded toward zero);
    # test_cuda.py checks the tensor-core path.
    q, k, v = _qkv(b, h, lq, lk, d, dtype)
    _assert_flash_criterion(ops.attention(q, k, v, causal), q, k, v, causal)


def test_explicit_scale(interpreter):
    q, k, v = _qkv(1, 2, 9, 9, 32, torch.float32)
    _assert_flash_criterion(ops.attention(q, k, v, True, 0.3), q, k, v, True, 0.3)


def test_causal_ignores_future_tokens(interpreter):
    # Random perturbations of keys/values after position t must leave outputs <= t alone.
    q, k, v = _qkv(1, 2, 13, 13, 32, torch.float32)
    t = 5
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] += torch.randn_like(k2[:, :, t + 1:])
    v2[:, :, t + 1:] += torch.randn_like(v2[:, :, t + 1:])
    out, out2 = ops.attention(q, k, v, True), ops.attention(q, k2, v2, True)
    assert torch.equal(out[:, :, : t + 1], out2[:, :, : t + 1])
    assert not torch.allclose(out[:, :, t + 1:], out2[:, :, t + 1:])


def test_strided_layouts(interpreter):
    b, h, lq, lk, d = 2, 3, 11, 19, 32
    # Projections as attention modules make them: [B, L, H*D] viewed as [B, H, L, D].
    q = torch.randn(b, lq, h * d).view(b, lq, h, d).transpose(1, 2)
    # K and V packed in one [B, L, 2, H, D] tensor (one fused projection).
    kv = torch.randn(b, lk, 2, h, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = attention_triton(q, k, v)
    assert out.is_contiguous()
    _assert_flash_criterion(out, q, k, v, False)


def test_reference_is_sdpa(reference_path):
    # The reference spells out what torch's SDPA computes, causal alignment included.
    for lq, lk, causal in [(77, 77, True), (7, 65, False), (5, 9, True)]:
        q, k, v = _qkv(2, 3, lq, lk, 32, torch.float32)
        torch.testing.assert_close(reference.attention(q, k, v, causal),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=2e-6, rtol=1e-5)


def test_errors(reference_path):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        ops.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="do not match"):
        ops.attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))


def test_opcheck(reference_path):
    q, k, v = _qkv(1, 2, 5, 7, 8, torch.float32)
    torch.library.opcheck(torch.ops.vlv.attention.default, (q, k, v, False, None))
    torch.library.opcheck(torch.ops.vlv.attention.default, (q, q.clone(), q.clone(), True, 0.5))
    torch.library.opcheck(torch.ops.vlv.attention.default,
                          (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, False, None))
