"""Plain-PyTorch references: the spec of each vlv op, its CPU path and the test oracle.

Each computes in the input dtype exactly as the unfused model code does, so swapping
a model's modules for the fused ones changes nothing on the CPU path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (nn.LayerNorm with a 1-D normalized_shape)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(LN(x + residual), x + residual): the sum, rounded to x's dtype, is both what is
    normalised and the residual the next block adds to."""
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                approximate: str = "none") -> torch.Tensor:
    """GELU(x @ weight^T + bias); weight in nn.Linear's [out, in] layout; approximate as
    nn.GELU ('none': exact erf, 'tanh') or 'quick' (CLIP's quick_gelu: x * sigmoid(1.702 x),
    written as transformers' QuickGELUActivation)."""
    h = F.linear(x, weight, bias)
    if approximate == "quick":
        return h * torch.sigmoid(1.702 * h)
    return F.gelu(h, approximate=approximate)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v on [B, H, L, D] tensors.

    scale defaults to 1/sqrt(D). Causal is top-left aligned, as in SDPA's is_causal:
    query i attends to keys 0..i. The softmax runs in at least fp32 (as SDPA's math
    path does for half inputs); the matmuls run in the input dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, Lq, Lk]
    if is_causal:
        lq, lk = scores.shape[-2:]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return torch.matmul(probs, v)  # [B, H, Lq, Dv]
