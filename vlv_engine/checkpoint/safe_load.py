"""Loading weights without executing anything found in a file.

safetensors files hold tensors only. Pickled files (`.pt`, `.bin`, `.pth`) are
loaded with `torch.load(weights_only=True)`, whose unpickler rebuilds tensors and
plain containers and refuses every other global; a refusal is reported, never
retried in an unsafe mode.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file


class UnsafeCheckpointError(RuntimeError):
    """A pickled checkpoint asked for more than tensors and plain containers."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a safetensors or (weights-only) pickle file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the pickle needs more than tensors and plain containers "
            f"({str(err).splitlines()[0]}). vlv-engine never executes code from checkpoints; convert the "
            f"file to safetensors in a trusted environment if it is genuine."
        ) from None
    if isinstance(obj, dict) and "model_state_dict" in obj and isinstance(obj["model_state_dict"], dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a flat state dict of tensors, got {type(obj).__name__}")
    return obj


def _is_zip(path: Path) -> bool:
    # torch.save's zip format can be memory-mapped; the legacy format cannot.
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
