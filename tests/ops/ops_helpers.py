"""Shared helpers for the op tests (conftest holds the fixtures)."""

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

needs_cuda = pytest.mark.skipif(
    not (HAS_TRITON and HAS_CUDA),
    reason="needs a CUDA GPU and triton: checks the compiled kernels (tensor-core fp16/bf16 dots, "
           "hardware rounding) that Triton's CPU interpreter does not model",
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: relative to the tensor's scale, not per element
    (per-element ratios blow up at the zeros of GELU and of centred rows)."""
    ref64 = ref.double()
    return ((out.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()
