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

    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    y = xc * (1.0 / tl.sqrt(var + eps))
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
