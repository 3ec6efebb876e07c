"""Int8 for the encoder path (pixels -> Florence-2 -> queries -> phi -> text encoder) on a CPU.

| scheme | device | weights | activations | kernel |
| --- | --- | --- | --- | --- |
| int8_dynamic | CPU | int8 per output channel | int8 per tensor, scaled per call | fbgemm (AVX2 / AVX-512) |

Why this exists: in fp32 the eager encoder spends ~70 % of its time in matrix products
that already run at ~80 % of a 2-core AVX2 machine's FMA peak, so no fp32 backend can make
the path much faster than ~1.8x. Int8 products do twice the multiply-adds per
instruction. Every `nn.Linear` of the encoder and the bottleneck becomes PyTorch's
dynamically quantized linear; convolutions and attention's own products stay fp32.

What it costs, measured (benchmarks/README.md): the bundled nano model captions 90.8 % of
500 held-out Shapes World scenes exactly, against 91.6 % in fp32 (object F1 0.938 vs
0.941).

It is opt-in (`Engine(encoder_quantize="int8_dynamic")`, `--encoder-quantize`), CPU only,
float32 only, with the eager encoder backend: the quantized linear is an opaque fbgemm
call that torch.compile and the Triton path do not trace.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

ENCODER_SCHEMES = ("int8_dynamic",)


def check_encoder_scheme(scheme: str, device: str | torch.device, dtype: torch.dtype, backend: str) -> str:
    """Refuse a scheme that cannot run here, with the reason; return the encoder backend to
    use ("auto" becomes "eager", the only one that runs the quantized linears)."""
    if scheme not in ENCODER_SCHEMES:
        raise ValueError(f"unknown encoder quantization {scheme!r}; choose one of {list(ENCODER_SCHEMES)}")
    device = torch.device(device)
    if device.type != "cpu":
        raise ValueError(f"encoder_quantize={scheme!r} runs on a CPU only (fbgemm kernels); on {device} use "
                         "encoder_backend='triton' in bfloat16 instead")
    if dtype != torch.float32:
        raise ValueError(f"encoder_quantize={scheme!r} needs float32 activations, got dtype {dtype}")
    engines = torch.backends.quantized.supported_engines
    if not {"fbgemm", "x86"} & set(engines) or not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise ValueError(f"encoder_quantize={scheme!r} needs PyTorch's fbgemm/x86 quantized engine; this build "
                         f"has {engines}")
    if backend not in ("auto", "eager"):
        raise ValueError(f"encoder_quantize={scheme!r} runs with the eager encoder backend only (its int8 "
                         f"linears are opaque to torch.compile and Triton), got encoder_backend={backend!r}")
    return "eager"


def quantize_encoder(modules: list[nn.Module], scheme: str) -> int:
    """Swap every `nn.Linear` in `modules` (in place) for its int8 dynamic version; returns
    how many were swapped."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if scheme not in ENCODER_SCHEMES:
        raise ValueError(f"unknown encoder quantization {scheme!r}; choose one of {list(ENCODER_SCHEMES)}")
    count = 0
    with warnings.catch_warnings():
        # PyTorch announces that its quantized tensor type will go; these kernels are the
        # fast int8 GEMMs on an AVX2 CPU today (torchao's int8 path is slower than fp32
        # there in eager). check_encoder_scheme refuses cleanly once they are gone.
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        for root in modules:
            for parent in list(root.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:  # subclasses (NonDynamicallyQuantizableLinear, ...) keep fp32
                        child.qconfig = per_channel_dynamic_qconfig
                        setattr(parent, name, DynamicLinear.from_float(child))
                        count += 1
    return count
