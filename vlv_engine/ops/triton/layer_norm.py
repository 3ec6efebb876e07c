"""LayerNorm over the last dim, with an optional fused residual add.

out = LN(x + residual) * weight + bias, and (with a residual) the sum x + residual
is stored too, as the next block's residual: one read of x and residual, one write
of each output, instead of three kernels and two extra round trips through memory.

Design and trade-offs:
- One program per row, the whole row in registers (BLOCK_N = next_pow2(N) >= N).
  Right for this path's hidden sizes (32..2048); rows above ~16k would spill and
  want a looped two-pass variant instead.
- Mean, then variance of the centred row (two passes over registers, not E[x^2] -
  E[x]^2) in fp32 whatever the input dtype: no cancellation for offset inputs.
- The sum is rounded to the input dtype *before* it is normalised, so the fused op
  gives bit-for-bit what `LN(x + r)` gives in that dtype, and the stored residual is
  exactly the tensor that was normalised.
- Every load is cast to fp32 at once (also what Triton's CPU interpreter needs for bf16).
- Assumes the last dim is contiguous (stride 1); rows may have any stride.
- Only Triton builtins are called. tl.sum, tl.max, tl.zeros, tl.cdiv, tl.sigmoid are
  themselves @triton.jit functions, and Triton's interpreter cannot call one that was
  decorated before TRITON_INTERPRET was set (torch._dynamo, hence transformers, imports
  triton early: tests would depend on import order). Sums are therefore spelled
  tl.reduce(x, axis, tl.standard._sum_combine), exactly what tl.sum expands to for
  fp32; tl.reduce is a builtin the interpreter replaces, and it recognises triton's own
  combine functions (a private name: tests/ops/test_runtime.py guards it).
"""

import triton
import triton.language as tl


@triton.jit
def layer_norm_fwd_kernel(
    X, R, W, B, Y, S,  # S: where x + residual goes (only with HAS_RESIDUAL)
    stride_x, stride_r, stride_y, stride_s,  # row strides, in elements
    N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)

    mean = tl.reduce(x, 0, tl.standard._sum_combine) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.reduce(xc * xc, 0, tl.standard._sum_combine) / N
    y = xc * (1.0 / tl.sqrt(var + eps))
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
