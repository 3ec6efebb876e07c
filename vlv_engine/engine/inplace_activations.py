"""GELU over its own input in the vision tower's MLPs, for inference.

Florence-2's DaViT MLP is fc1 -> GELU -> fc2 on every image token. Its first stage runs
36,864 tokens per 768 px image at 4x width, so fc1's output and GELU's output are each
~75 MB per image in bf16, alive together: at batch 8 the pair is the encoder's peak,
1.2 GB of its 1.8 GB (the paper model, counted on the meta device). Nothing reads fc1's
output after the GELU, so the GELU can write over it: the encoder's peak at batch 8
drops to 1.5 GB, with the same kernel and the same values.

`InplaceGELU` does that when no gradient needs its input (inference, `torch.no_grad`, or
frozen weights), and is the ordinary GELU otherwise, so a model it was put into still
trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The MLPs whose forward is exactly fc1 -> activation_fn -> fc2 (transformers' Florence-2).
MLP_CLASSES = ("Florence2VisionMLP",)


class InplaceGELU(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.gelu(x, approximate=self.approximate)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, in place without autograd"


def _gelu_kind(act: nn.Module) -> str | None:
    """The GELU's `approximate` if `act` is an exact or tanh GELU we can replace, else None."""
    if isinstance(act, nn.GELU):
        return act.approximate
    from transformers.activations import GELUActivation, GELUTanh

    if type(act) is GELUActivation:
        return "none"
    if type(act) is GELUTanh:
        return "tanh"
    return None


def inplace_mlp_activations(model: nn.Module) -> int:
    """Swap the GELU of every MLP named in `MLP_CLASSES` for `InplaceGELU`; returns how many."""
    made = 0
    for module in model.modules():
        if type(module).__name__ in MLP_CLASSES and not isinstance(module.activation_fn, InplaceGELU):
            approximate = _gelu_kind(module.activation_fn)
            if approximate is not None:
                module.activation_fn = InplaceGELU(approximate)
                made += 1
    return made
