"""Drop-in nn.Modules over the vlv ops, built from the modules they replace.

They share (not copy) the original parameters under the same names, so state dicts,
checkpoints and weight tying are unchanged:

    ln = FusedLayerNorm.from_module(clip.final_layer_norm)
    phi = fuse_projector(encoder.language_proj)   # Sequential(FusedLinearGELU, Identity, Linear)

Which modules get replaced, and when, is the engine's choice; nothing here patches
a model. Inference only: the ops have no backward.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlv_engine.ops.layer_norm import layer_norm
from vlv_engine.ops.linear_gelu import linear_gelu


class FusedLayerNorm(nn.Module):
    """nn.LayerNorm over the last dim; ``forward(x, residual)`` also fuses the add and
    returns (LN(x + residual), x + residual)."""

    def __init__(self, weight: nn.Parameter | None, bias: nn.Parameter | None, eps: float):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.eps = eps

    @classmethod
    def from_module(cls, ln: nn.LayerNorm) -> "FusedLayerNorm":
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"FusedLayerNorm normalises the last dim only; got normalized_shape "
                             f"{tuple(ln.normalized_shape)}")
        return cls(ln.weight, ln.bias, ln.eps)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual)

    def extra_repr(self) -> str:
        n = self.weight.shape[0] if self.weight is not None else "?"
        return f"({n},), eps={self.eps}, affine={self.weight is not None}"


class FusedLinearGELU(nn.Module):
    """GELU(Linear(x)) in one kernel; parameters named as the Linear's."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, approximate: str = "none"):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.approximate = approximate

    @classmethod
    def from_modules(cls, linear: nn.Linear, gelu: nn.GELU) -> "FusedLinearGELU":
        if not isinstance(gelu, nn.GELU):
            raise TypeError(f"FusedLinearGELU fuses nn.GELU, got {type(gelu).__name__}")
        return cls(linear.weight, linear.bias, gelu.approximate)

    def forward(self, x: Tensor) -> Tensor:
        return linear_gelu(x, self.weight, self.bias, self.approximate)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, " \
               f"bias={self.bias is not None}, approximate={self.approximate!r}"


def fuse_projector(proj: nn.Sequential) -> nn.Sequential:
    """Linear -> GELU -> Linear (phi, psi) as FusedLinearGELU -> Identity -> Linear.

    The Identity keeps the second Linear at index 2, so the state-dict keys
    (``0.weight``, ``2.bias``, ...) stay those of the checkpoint format.
    """
    if len(proj) != 3 or not isinstance(proj[0], nn.Linear) or not isinstance(proj[2], nn.Linear):
        raise ValueError(f"fuse_projector expects Sequential(Linear, GELU, Linear), got {proj}")
    return nn.Sequential(FusedLinearGELU.from_modules(proj[0], proj[1]), nn.Identity(), proj[2])
