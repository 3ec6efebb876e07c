"""Choose the UNet backend once, from declared constraints, and build its runner.

Preferences: "auto" | "eager" | "onnx" | "tensorrt" | "compile".

``auto``:
  * CUDA: tensorrt if it imports, else compile (torch.compile), else eager;
  * CPU, float32: onnx (ONNX Runtime) if onnxruntime, onnx and onnxscript are
    installed, else eager;
  * CPU, fp16/bf16: eager (the ONNX graph runs in fp32: not what the dtype asked for);
  * any other device: eager.
An explicit preference is honoured or refused with the reason (`BackendUnavailable`);
it never falls back silently. Eager is always available.

Availability is probed without importing onnxruntime (``find_spec``) and imports
tensorrt only for a CUDA device; tests pass ``available=`` to simulate machines.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import torch

BACKENDS = ("eager", "onnx", "tensorrt", "compile")
PREFERENCES = ("auto", *BACKENDS)
ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")


@runtime_checkable
class UNetRunner(Protocol):
    """``(latents [B, C, h, w], t scalar | 0-d | [B], context [B, Nq, D]) -> noise [B, C, h, w]``,
    in the dtype of ``latents``: what `DiffusionDecoder.predict_noise` returns."""

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


class BackendUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class BackendChoice:
    name: str  # one of BACKENDS
    reason: str
    preference: str = "auto"


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def probe_availability(device: str | torch.device = "cpu") -> dict[str, bool]:
    """Which backends this process can run on `device` (never initialises CUDA itself)."""
    from vlv_engine.engine.backends.tensorrt_backend import tensorrt_available

    cuda = torch.device(device).type == "cuda"
    return {"eager": True,
            "onnx": all(_installed(p) for p in ONNX_PACKAGES),
            "tensorrt": cuda and tensorrt_available(),
            "compile": hasattr(torch, "compile")}


def _missing(name: str) -> str:
    from vlv_engine.engine.backends.tensorrt_backend import MISSING_MESSAGE

    return {"onnx": "the onnx backend needs onnxruntime, onnx and onnxscript: pip install 'vlv-engine[onnx]'",
            "tensorrt": MISSING_MESSAGE,
            "compile": "torch.compile is not available in this torch build"}[name]


def select_backend(preference: str = "auto", *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, available: Mapping[str, bool] | None = None) -> BackendChoice:
    if preference not in PREFERENCES:
        raise ValueError(f"unknown UNet backend {preference!r}; choose one of {PREFERENCES}")
    if preference == "eager":
        return BackendChoice("eager", "requested", preference)  # no probing: the default stays free
    kind = torch.device(device).type
    avail = dict(probe_availability(device) if available is None else available)
    avail["eager"] = True
    if preference != "auto":
        if preference == "tensorrt" and kind != "cuda":
            raise BackendUnavailable(f"the tensorrt backend needs a CUDA device, this engine runs on {kind}")
        if not avail.get(preference, False):
            if preference == "tensorrt":
                from vlv_engine.engine.backends.tensorrt_backend import TensorRTUnavailable

                raise TensorRTUnavailable(_missing("tensorrt"))
            raise BackendUnavailable(_missing(preference))
        return BackendChoice(preference, "requested", preference)
    if kind == "cuda":
        if avail.get("tensorrt"):
            return BackendChoice("tensorrt", "CUDA device and TensorRT imports")
        if avail.get("compile"):
            return BackendChoice("compile", "CUDA device, TensorRT not installed: torch.compile")
        return BackendChoice("eager", "CUDA device, neither TensorRT nor torch.compile available")
    if kind == "cpu":
        if dtype != torch.float32:
            return BackendChoice("eager", f"CPU in {dtype}: the ONNX graph would run in float32")
        if avail.get("onnx"):
            return BackendChoice("onnx", "CPU, float32, onnxruntime installed")
        return BackendChoice("eager", "CPU, onnxruntime not installed")
    return BackendChoice("eager", f"no accelerated UNet backend for {kind} devices")


class EagerUNetRunner:
    """The plain PyTorch UNet step behind the `UNetRunner` interface (the reference)."""

    backend = "eager"

    def __init__(self, decoder):
        from vlv_engine.engine.backends.contract import UNetStep

        self.step = UNetStep(decoder.unet, decoder.coord_channels).eval()

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        from vlv_engine.engine.backends.contract import batch_timestep

        dtype = self.step.unet.dtype
        return self.step(latents.to(dtype), batch_timestep(t, latents), context.to(dtype)).to(latents.dtype)


def build_unet_runner(choice: BackendChoice | str, decoder, *, num_queries: int, max_batch: int = 8,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      cache_dir: str | Path | None = None, threads: int | None = None,
                      channels_last: bool = False, cuda_graph: bool = False) -> UNetRunner:
    """The runner for a chosen backend over `decoder` (a `DiffusionDecoder`)."""
    name = choice.name if isinstance(choice, BackendChoice) else choice
    if name == "eager":
        return EagerUNetRunner(decoder)
    if name == "onnx":
        from vlv_engine.engine.backends.onnx_backend import onnx_unet_runner

        return onnx_unet_runner(decoder, num_queries=num_queries, max_batch=max_batch, cache_dir=cache_dir,
                                device=device, threads=threads)
    if name == "tensorrt":
        from vlv_engine.engine.backends.tensorrt_backend import tensorrt_unet_runner

        return tensorrt_unet_runner(decoder, num_queries=num_queries, max_batch=max_batch, dtype=dtype,
                                    device=device, cache_dir=cache_dir, cuda_graph=cuda_graph)
    if name == "compile":
        from vlv_engine.engine.backends.compile_backend import CompiledUNetRunner

        return CompiledUNetRunner(decoder, channels_last=channels_last)
    raise ValueError(f"unknown UNet backend {name!r}; choose one of {BACKENDS}")


def build_vae_decoder_runner(choice: BackendChoice | str, decoder, *, max_batch: int = 8,
                             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                             cache_dir: str | Path | None = None, threads: int | None = None):
    """The VAE decoder's runner on the backend chosen for the UNet; None for eager (the
    decoder then calls ``vae.decode`` itself). The VAE keeps its own dtype (`vae_dtype`)."""
    name = choice.name if isinstance(choice, BackendChoice) else choice
    if name in ("eager", "custom"):
        return None
    if name == "onnx":
        from vlv_engine.engine.backends.onnx_backend import onnx_vae_decoder_runner

        return onnx_vae_decoder_runner(decoder, max_batch=max_batch, cache_dir=cache_dir, device=device,
                                       threads=threads)
    if name == "tensorrt":
        from vlv_engine.engine.backends.tensorrt_backend import tensorrt_vae_decoder_runner

        return tensorrt_vae_decoder_runner(decoder, max_batch=max_batch, dtype=decoder.vae.dtype, device=device,
                                           cache_dir=cache_dir)
    if name == "compile":
        from vlv_engine.engine.backends.compile_backend import CompiledVAEDecoderRunner

        return CompiledVAEDecoderRunner(decoder)
    raise ValueError(f"unknown VAE decoder backend {name!r}; choose one of {BACKENDS}")
