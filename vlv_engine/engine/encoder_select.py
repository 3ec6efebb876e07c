"""Choose the encoder-path backend once, from declared constraints.

The encoder path is pixels -> Florence-2 -> queries -> phi -> CLIP text encoder ->
caption embedding [B, Nq, D]. Preferences: "auto" | "eager" | "compile" | "triton".

``auto``:
  * CUDA, triton installed, dtype fp32/fp16/bf16: triton (the fused vlv ops, and the
    fixed-shape phi -> text encoder segment replayed from CUDA graphs);
  * CUDA otherwise: eager (torch.compile's CUDA backend needs triton too);
  * CPU: compile (torch.compile, inductor's C++ code) when a C++ compiler is on PATH,
    else eager;
  * any other device: eager.
An explicit preference is honoured or refused at construction with what is missing
(`EncoderBackendUnavailable`); it never falls back silently. Eager always exists.

Probing imports nothing optional (``find_spec``) and never initialises CUDA; tests
pass ``available=`` to simulate machines.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from typing import Mapping

import torch

from vlv_engine.engine.backends.select import BackendUnavailable

ENCODER_BACKENDS = ("eager", "compile", "triton")
ENCODER_PREFERENCES = ("auto", *ENCODER_BACKENDS)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class EncoderBackendUnavailable(BackendUnavailable):
    pass


@dataclass(frozen=True)
class EncoderBackendChoice:
    name: str  # one of ENCODER_BACKENDS
    reason: str
    preference: str = "auto"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_for(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
    """Why backend `name` cannot run on (device, dtype) in this process, or None when it can."""
    kind = torch.device(device).type
    if name == "eager":
        return None
    if name == "compile":
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch build"
        if kind == "cpu" and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            return "torch.compile on a CPU needs a C++ compiler on PATH (c++, g++ or clang++)"
        if kind == "cuda" and not _installed("triton"):
            return "torch.compile on CUDA generates Triton kernels: pip install 'vlv-engine[triton]'"
        return None
    if name == "triton":
        if not _installed("triton"):
            return "the triton encoder backend needs triton: pip install 'vlv-engine[triton]'"
        if dtype not in TRITON_DTYPES:
            return f"the triton kernels run float32, float16 and bfloat16, not {dtype}"
        if kind == "cuda":
            return None
        if kind == "cpu" and _flag("TRITON_INTERPRET") and _flag("VLV_TRITON_ON_CPU"):
            return None  # Triton's interpreter: for checking the kernels, not for speed
        return (f"the triton encoder backend needs a CUDA device (this engine runs on {kind}); on a CPU only "
                "Triton's interpreter can run it (TRITON_INTERPRET=1 and VLV_TRITON_ON_CPU=1, for tests)")
    raise ValueError(f"unknown encoder backend {name!r}; choose one of {ENCODER_BACKENDS}")


def select_encoder_backend(preference: str = "auto", *, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32,
                           available: Mapping[str, bool] | None = None) -> EncoderBackendChoice:
    if preference not in ENCODER_PREFERENCES:
        raise ValueError(f"unknown encoder backend {preference!r}; choose one of {ENCODER_PREFERENCES}")
    if preference == "eager":
        return EncoderBackendChoice("eager", "requested", preference)
    kind = torch.device(device).type

    def why_not(name: str) -> str | None:
        if available is not None and name != "eager":
            return None if available.get(name, False) else f"{name} is not available (declared)"
        return missing_for(name, device, dtype)

    if preference != "auto":
        reason = why_not(preference)
        if reason is not None:
            raise EncoderBackendUnavailable(f"encoder_backend={preference!r} cannot run here: {reason}")
        return EncoderBackendChoice(preference, "requested", preference)
    if kind == "cuda":
        if why_not("triton") is None:
            return EncoderBackendChoice("triton", f"CUDA device, triton installed, {dtype}")
        return EncoderBackendChoice("eager", f"CUDA device: {why_not('triton')}")
    if kind == "cpu":
        if why_not("compile") is None:
            return EncoderBackendChoice("compile", "CPU: torch.compile (inductor C++)")
        return EncoderBackendChoice("eager", f"CPU: {why_not('compile')}")
    return EncoderBackendChoice("eager", f"no accelerated encoder backend for {kind} devices")
