"""The two-layer projector used for phi (language_proj) and psi (caption_proj)."""

from torch import nn


def projector(in_features: int, out_features: int) -> nn.Sequential:
    # Indices 0 and 2 are part of the checkpoint format (`language_proj.0.weight`, ...).
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))
