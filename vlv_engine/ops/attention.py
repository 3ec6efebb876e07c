"""Attention forward on [B, H, L, D] tensors: softmax(q k^T * scale) v.

For this path's shapes: CLIP's causal self-attention (L <= 77) and the Florence
decoder's cross-attention (Nq queries over ~600 keys). Causal is top-left aligned
(SDPA's is_causal). No attention masks, no dropout, no GQA. Custom op
``vlv::attention``; forward only (inference path): backward through it raises.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vlv_engine.ops import reference
from vlv_engine.ops._runtime import Launch, backend_for, dot_precision, next_pow2, upcast_in_kernel

LOG2E = 1.4426950408889634
MAX_TRITON_HEAD_DIM = 256


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


def _use_triton(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (backend_for(q) == "triton" and q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and v.shape[-1] == q.shape[-1] <= MAX_TRITON_HEAD_DIM and k.shape[2] > 0)


def attention_launch(q: Tensor, k: Tensor, v: Tensor, o: Tensor, is_causal: bool = False,
                     scale: Optional[float] = None) -> Launch:
    """The kernel launch that writes attention(q, k, v) into o [B, H, Lq, D]."""
    from vlv_engine.ops.triton.attention import attention_fwd_kernel

    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_d = max(16, next_pow2(d))
    block_m = 16 if lq <= 16 else 32 if lq <= 32 else 64
    block_n = 64 if block_d <= 64 else 32  # keeps K, V blocks + accumulator in registers at D = 128..256
    if block_d > 128 and q.element_size() == 4:
        # fp32 at D = 256: 64 x 32 tiles need 136 KB of shared memory, over the 99 KB of an
        # sm_86 / sm_89 (consumer) GPU; 32 x 16 need 66 KB (tests/ops/test_triton_aot.py).
        block_m, block_n = min(block_m, 32), 16
    return Launch(attention_fwd_kernel, ((lq + block_m - 1) // block_m, b * h), (
        q, k, v, o,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h, lq, lk, d,
        scale * LOG2E,
    ), dict(
        IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast_in_kernel(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4 if block_d <= 64 else 8, num_stages=2,
    ))


def attention_triton(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                     scale: Optional[float] = None) -> Tensor:
    """Launch the Triton kernel; the output is a contiguous [B, H, Lq, D]."""
    _check(q, k, v)
    o = q.new_empty(q.shape)
    if o.numel():
        attention_launch(q, k, v, o, is_causal, scale).run()
    return o


@torch.library.custom_op("vlv::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: Optional[float]) -> Tensor:
    _check(q, k, v)
    if _use_triton(q, k, v):
        return attention_triton(q, k, v, is_causal, scale)
    return reference.attention(q, k, v, is_causal, scale).contiguous()


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: Optional[float]) -> Tensor:
    _check(q, k, v)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v for q [B, H, Lq, D], k and v [B, H, Lk, D] (any strides);
    scale defaults to 1/sqrt(D); is_causal: query i sees keys 0..i."""
    return torch.ops.vlv.attention(q, k, v, is_causal, scale)
