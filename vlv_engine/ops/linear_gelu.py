"""y = GELU(x @ weight^T + bias) in one kernel: the first Linear and the GELU of phi/psi.

``approximate`` follows nn.GELU: 'none' (exact erf, the default) or 'tanh'; 'quick' is
CLIP's ``quick_gelu``, x * sigmoid(1.702 x) (OpenAI CLIP text encoders). Custom op
``vlv::linear_gelu``; forward only (inference path): backward through it raises.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlv_engine.ops import reference
from vlv_engine.ops._runtime import Launch, backend_for, dot_precision, rows, upcast_in_kernel

_GELU_APPROXIMATIONS = ("none", "tanh", "quick")
_ACT_CODE = {"none": 0, "tanh": 1, "quick": 2}  # the kernel's ACT


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> None:
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"linear_gelu: approximate must be one of {_GELU_APPROXIMATIONS}, got {approximate!r}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_gelu: weight shape {tuple(weight.shape)} does not take inputs of "
                         f"size {x.shape[-1]} (expected [out, {x.shape[-1]}])")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_gelu: bias shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def _use_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    same_dtype = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    return (backend_for(x) == "triton" and same_dtype
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16))


def _blocks(m: int, n: int, dtype: torch.dtype) -> tuple[int, int, int]:
    # M is batch x Nq (77 per image): small tiles for single images, 64 beyond.
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if n <= 64 else 128
    block_k = 32 if dtype == torch.float32 else 64
    return block_m, block_n, block_k


def linear_gelu_launch(x2: Tensor, weight: Tensor, bias: Optional[Tensor], y2: Tensor,
                       approximate: str = "none") -> Launch:
    """The kernel launch that writes GELU(x2 @ weight^T + bias) into y2 [M, N] (x2: [M, K])."""
    from vlv_engine.ops.triton.linear_gelu import linear_gelu_fwd_kernel

    n, k = weight.shape
    m = x2.shape[0]
    block_m, block_n, block_k = _blocks(m, n, x2.dtype)
    return Launch(linear_gelu_fwd_kernel, (((m + block_m - 1) // block_m) * ((n + block_n - 1) // block_n),), (
        x2, weight, bias.contiguous() if bias is not None else weight, y2,  # the kernel reads bias with unit stride
        m, n, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y2.stride(0), y2.stride(1),
    ), dict(
        HAS_BIAS=bias is not None, ACT=_ACT_CODE[approximate],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        UPCAST=upcast_in_kernel(x2.dtype), DOT_PRECISION=dot_precision(x2.dtype),
        num_warps=4, num_stages=3,
    ))


def linear_gelu_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str = "none") -> Tensor:
    """Launch the Triton kernel; the output is contiguous [..., out_features]."""
    _check(x, weight, bias, approximate)
    n = weight.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if y.numel():
        linear_gelu_launch(rows(x), weight, bias, y.view(-1, n), approximate).run()
    return y


@torch.library.custom_op("vlv::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    _check(x, weight, bias, approximate)
    if _use_triton(x, weight, bias):
        return linear_gelu_triton(x, weight, bias, approximate)
    return reference.linear_gelu(x, weight, bias, approximate).contiguous()


@_linear_gelu_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    _check(x, weight, bias, approximate)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """GELU(x @ weight^T + bias); weight is [out, in] as in nn.Linear."""
    return torch.ops.vlv.linear_gelu(x, weight, bias, approximate)
