"""Attention forward for the encoder-to-bottleneck path, FlashAttention-style.

Two shapes matter: CLIP's causal self-attention over L <= 77 tokens, and the Florence
decoder's non-causal cross-attention of Nq queries over ~600 encoder tokens. The
[Lq, Lk] score matrix never goes to memory: each program holds a BLOCK_M block of
queries and streams K/V in BLOCK_N blocks with an online softmax (running max m_i,
running sum l_i, rescaled fp32 accumulator), then divides once at the end.

Design and trade-offs:
- Grid (cdiv(Lq, BLOCK_M), B * H): with Lq = 77 and BLOCK_M = 64 that is 2 programs
  per (batch, head); enough to fill a GPU at batch >= 4 with 16 heads, short of it at
  batch 1 (a split-K variant would help there; not worth it at these lengths).
- Head dim 16..256 via BLOCK_D = next_pow2(D) with masked loads (80, 96 work).
- Causal is top-left aligned like torch SDPA's is_causal (query i sees keys <= i);
  key blocks past the diagonal are skipped, the diagonal ones masked. No other masks:
  this path has no padding. Row 0 always sees key 0, so no row is ever empty and
  m_i is finite after the first block (no inf - inf).
- Scores are scaled by scale * log2(e) and exponentiated with exp2.
- Any strides for q, k, v, out (e.g. [B, L, H, D] projections viewed as [B, H, L, D]).
- fp32 inputs use an IEEE dot unless torch allows TF32 (DOT_PRECISION). fp16/bf16:
  tensor-core dots with fp32 accumulation; P is rounded to V's dtype for the second
  dot, as FlashAttention does. UPCAST (interpreter + bf16 only) loads to fp32.
- Only builtins: row max and sum via tl.reduce with triton's own combine functions
  (what tl.max and tl.sum expand to for fp32), tl.full for tl.zeros; see the note in
  layer_norm.py on the interpreter.
- Forward only: no logsumexp is saved, there is no backward (inference path).
"""

import triton
import triton.language as tl


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, LQ, LK, HEAD_DIM,
    qk_scale,  # softmax scale * log2(e)
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < LQ) & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    hi = LK
    if IS_CAUSAL:
        hi = tl.minimum(LK, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < LK
        kt = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N] = K^T block
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)

        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        valid = n_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        qk = tl.where(valid, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < LQ) & d_ok[None, :])
