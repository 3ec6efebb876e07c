"""y = GELU(x @ W^T + b): the first half of phi/psi (Linear -> GELU -> Linear).

The bias and GELU are applied to the fp32 accumulator in registers before the single
store, so the [M, N] pre-activation never goes to memory (unfused: matmul writes it,
GELU reads it and writes again).

Design and trade-offs:
- Classic tiled matmul: each program owns a [BLOCK_M, BLOCK_N] tile of y and walks K
  in BLOCK_K steps with tl.dot into an fp32 accumulator. Programs are ordered in
  GROUP_M-row groups so neighbouring programs reuse the same W tiles from L2.
- No @triton.autotune (it does not run in the interpreter): the launcher picks block
  sizes from M, N (M is small here: batch x 77 queries). Tuning on a GPU may pay.
- W is read in nn.Linear's [N, K] layout through its strides (no transpose copy).
- fp32 inputs: IEEE dot unless torch allows TF32 (DOT_PRECISION), so fp32 results
  match F.linear. fp16/bf16: tensor-core dot, fp32 accumulation, one rounding at the
  store (the unfused path rounds after the matmul and again after GELU).
- Exact GELU: 0.5 x (1 + erf(x / sqrt 2)), nn.GELU()'s default. Tanh GELU is written
  x * sigmoid(2 u), u = sqrt(2/pi)(x + 0.044715 x^3), the same function as
  0.5 x (1 + tanh u) without tl.extra.libdevice (not in the interpreter) and without
  the cancellation of 1 + tanh u for negative x; the sigmoid is spelled out with tl.exp.
- Quick GELU (CLIP's ``quick_gelu``, OpenAI CLIP-L's text encoder): x * sigmoid(1.702 x).
- Only builtins (no tl.cdiv, tl.sigmoid, tl.zeros: those are @triton.jit functions,
  which the interpreter cannot call when triton was imported before TRITON_INTERPRET
  was set; see layer_norm.py).
- UPCAST (set only in the interpreter, for bf16): loads go to fp32 because the
  interpreter's dot would multiply raw bf16 bit patterns.
"""

import triton
import triton.language as tl


@triton.jit
def linear_gelu_fwd_kernel(
    X, W, B, Y,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,  # 0: erf GELU, 1: tanh GELU, 2: quick GELU
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] = W^T tile

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        z = 1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)  # 2 * sqrt(2 / pi) * (...)
        y = acc / (1.0 + tl.exp(-z))  # x * sigmoid(z); exp overflow -> inf -> y = 0, the right limit
    elif ACT == 2:
        y = acc / (1.0 + tl.exp(-1.702 * acc))
    else:
        y = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))  # 1 / sqrt(2)

    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
