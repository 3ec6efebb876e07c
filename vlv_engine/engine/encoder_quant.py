"""Int8 for the encoder path (pixels -> Florence-2 -> queries -> phi -> text encoder) on a CPU.

| scheme | device | weights | activations | kernel |
| --- | --- | --- | --- | --- |
| int8_dynamic | CPU | int8 per output channel | int8 per tensor, scaled per call | fbgemm (AVX2 / AVX-512) |

Why this exists: in fp32 the eager encoder spends ~70 % of its time in matrix products
that already run at ~80 % of a 2-core AVX2 machine's FMA peak, so no fp32 backend can make
the path much faster than ~1.8x. Int8 products do twice the multiply-adds per
instruction. Every `nn.Linear` of Florence-2 (vision tower, projector, BART encoder and
decoder) becomes PyTorch's dynamically quantized linear (`int8_parts`); convolutions,
attention's own products, phi and the bottleneck stay fp32.

What it costs, measured (benchmarks/README.md), on the bundled nano model's 500 held-out
Shapes World scenes: see `tests/quant/test_encoder_quant.py` for the figures.

It is opt-in (`Engine(encoder_quantize="int8_dynamic")`, `--encoder-quantize`), CPU only,
float32 only, with the eager or the compile encoder backend ("auto" picks as it does in
float32: compile where a C++ compiler is found). Compiled, each int8 product is one
opaque fbgemm call (`fbgemm_int8.FbgemmLinear`) and inductor fuses what lies between
them: the norms, residual adds and window layout copies that eager runs one by one.
"""

from __future__ import annotations

import torch
from torch import nn

from vlv_engine.engine.fbgemm_int8 import swap_linears, unavailable_reason

ENCODER_SCHEMES = ("int8_dynamic",)


def check_encoder_scheme(scheme: str, device: str | torch.device, dtype: torch.dtype, backend: str) -> str:
    """Refuse a scheme that cannot run here, with the reason; return the encoder backend
    preference to use (the one given: "auto", "eager" or "compile")."""
    if scheme not in ENCODER_SCHEMES:
        raise ValueError(f"unknown encoder quantization {scheme!r}; choose one of {list(ENCODER_SCHEMES)}")
    device = torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"encoder_quantize={scheme!r} runs on a CPU only (fbgemm kernels); on {device} use "
                         "encoder_backend='triton' in bfloat16 instead")
    if dtype != torch.float32:
        raise ValueError(f"encoder_quantize={scheme!r} needs float32 activations, got dtype {dtype}")
    reason = unavailable_reason()
    if reason:
        raise ValueError(f"encoder_quantize={scheme!r}: {reason}")
    if backend not in ("auto", "eager", "compile"):
        raise ValueError(f"encoder_quantize={scheme!r} runs with the eager or compile encoder backend (the "
                         f"Triton kernels take float activations), got encoder_backend={backend!r}")
    return backend


def int8_parts(model: nn.Module) -> list[nn.Module]:
    """What the scheme quantizes: Florence-2 (the vision tower, its projector, the BART
    encoder over ~600 image tokens at 768 px and the query decoder that cross-attends to
    them), ~98 % of the path's time on the small preset. phi and the bottleneck (the text
    encoder and psi, over 77 tokens) make the caption embedding itself and stay float32."""
    return [model.encoder.florence]


def quantize_encoder(model: nn.Module, scheme: str) -> int:
    """Swap every plain `nn.Linear` of `int8_parts(model)` (in place) for its int8 dynamic
    version; returns how many were swapped."""
    if scheme not in ENCODER_SCHEMES:
        raise ValueError(f"unknown encoder quantization {scheme!r}; choose one of {list(ENCODER_SCHEMES)}")
    return swap_linears(int8_parts(model))
