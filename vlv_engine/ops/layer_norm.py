"""LayerNorm over the last dim, optionally fused with the residual add before it.

    out = layer_norm(x, weight, bias, eps)                 # LN(x)
    out, s = layer_norm(x, weight, bias, eps, residual=r)  # LN(x + r), and s = x + r

Two custom ops: ``vlv::layer_norm`` and ``vlv::add_layer_norm`` (a custom op may not
return one of its inputs, so "no residual" cannot be a second output of one op).
Forward only: the ops have no autograd formula (inference path); backward through
them raises.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlv_engine.ops import reference
from vlv_engine.ops._runtime import Launch, backend_for, next_pow2, rows

# One row per program in registers; wider rows would spill (see the kernel's header).
MAX_TRITON_HIDDEN = 16384


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]) -> None:
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)}, expected ({n},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def _use_triton(x: Tensor, *others: Optional[Tensor]) -> bool:
    # Mixed dtypes promote in the reference; the kernel would store in x's dtype.
    same_dtype = all(t is None or t.dtype == x.dtype for t in others)
    return (backend_for(x) == "triton" and same_dtype and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and 0 < x.shape[-1] <= MAX_TRITON_HIDDEN)


def layer_norm_launch(x2: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, y2: Tensor,
                      residual2: Optional[Tensor] = None, s2: Optional[Tensor] = None) -> Launch:
    """The kernel launch for rows [M, N] (unit stride along N): y2 = LN(x2 [+ residual2]),
    and s2 = x2 + residual2 with a residual."""
    from vlv_engine.ops.triton.layer_norm import layer_norm_fwd_kernel

    n = x2.shape[-1]
    r2 = residual2 if residual2 is not None else x2  # unused pointers: any valid tensor
    s2 = s2 if s2 is not None else y2
    block = next_pow2(n)
    return Launch(layer_norm_fwd_kernel, (x2.shape[0],), (
        x2, r2,
        weight.contiguous() if weight is not None else x2,
        bias.contiguous() if bias is not None else x2,
        y2, s2,
        x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
        n, eps,
    ), dict(
        HAS_RESIDUAL=residual2 is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block, num_warps=min(max(block // 256, 1), 8),
    ))


def layer_norm_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      residual: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Launch the Triton kernel: (LN(x [+ residual]), x + residual or None); outputs contiguous."""
    _check(x, weight, bias, residual)
    n = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    if x.numel() == 0:
        return y, s
    layer_norm_launch(rows(x), weight, bias, eps, y.view(-1, n), rows(residual) if residual is not None else None,
                      s.view(-1, n) if s is not None else None).run()
    return y, s


@torch.library.custom_op("vlv::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    _check(x, weight, bias, None)
    if _use_triton(x, weight, bias):
        return layer_norm_triton(x, weight, bias, eps)[0]
    return reference.layer_norm(x, weight, bias, eps).contiguous()


@_layer_norm_op.register_fake
def _(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    _check(x, weight, bias, None)
    return x.new_empty(x.shape)


@torch.library.custom_op("vlv::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float) -> tuple[Tensor, Tensor]:
    _check(x, weight, bias, residual)
    if _use_triton(x, residual, weight, bias):
        y, s = layer_norm_triton(x, weight, bias, eps, residual)
        return y, s
    y, s = reference.add_layer_norm(x, residual, weight, bias, eps)
    return y.contiguous(), s.contiguous()


@_add_layer_norm_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
      eps: float) -> tuple[Tensor, Tensor]:
    _check(x, weight, bias, residual)
    return x.new_empty(x.shape), x.new_empty(x.shape)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               residual: Optional[Tensor] = None) -> Tensor | tuple[Tensor, Tensor]:
    """LN(x) over the last dim; with ``residual``: (LN(x + residual), x + residual)."""
    if residual is None:
        return torch.ops.vlv.layer_norm(x, weight, bias, eps)
    return torch.ops.vlv.add_layer_norm(x, residual, weight, bias, eps)
