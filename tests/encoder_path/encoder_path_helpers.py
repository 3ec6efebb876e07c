"""Shared helpers for the encoder-path tests."""

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (relative to the tensor's scale)."""
    ref64 = ref.double()
    return ((out.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def snapshot(module: torch.nn.Module) -> dict:
    """Every parameter and buffer, cloned: to show a runner changed nothing in the model."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: torch.nn.Module, before: dict) -> bool:
    now = module.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)
