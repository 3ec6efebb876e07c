"""PyTorch's fbgemm dynamic int8 linear layers on a CPU: the swap that the encoder's int8
path (`encoder_quant`) and the LLM's `int8_dynamic_cpu` scheme (`quantize`) share.

What a swapped layer computes: symmetric int8 weights with one scale per output channel;
the input quantized on every call to uint8 over its own range (one scale per tensor, 7
bits on x86 so that AVX2's pairwise u8 x s8 sums cannot saturate); int32 accumulation;
float32 output plus the float32 bias.

Why these kernels: without AVX512-VNNI, fbgemm multiplies 32 int8 pairs per instruction
(vpmaddubsw), where any float32-activation kernel does 8 multiply-adds. Measured on the
2-core EPYC (benchmarks/README.md), the linears of one Qwen2.5-0.5B layer took 1.6 ms at
32 rows (8 captions x 4 beams) against 5.8 ms in our fp32-activation int8 kernel
(kernels/gemv), and 4x less at a 616-row prefill.

What they cost: the layer is an opaque call over a packed-weight object that
torch.compile cannot trace, so a model holding them runs eagerly; and the per-call
activation quantization moves results more than weight-only int8 does (each user states
its measured agreement).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn


def _engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def unavailable_reason() -> str:
    """Why the kernels cannot run in this PyTorch build ("" when they can)."""
    engines = _engines()
    if not {"fbgemm", "x86"} & set(engines) or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return f"it needs PyTorch's fbgemm/x86 quantized engine; this build has {engines}"
    return ""


def is_dynamic_int8(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def swap_linears(roots: Iterable[nn.Module]) -> int:
    """Replace every plain `nn.Linear` under `roots` (in place) by its dynamic int8 version;
    returns how many were replaced. Subclasses of nn.Linear (e.g. attention's
    NonDynamicallyQuantizableLinear) stay float."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    count = 0
    with warnings.catch_warnings():
        # PyTorch announces that its quantized tensor type will go; these kernels are the
        # fast int8 GEMMs on an AVX2 CPU today (torchao's int8 path is slower than fp32
        # there in eager). unavailable_reason() refuses cleanly once they are gone.
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated.*")
        for root in roots:
            for parent in list(root.modules()):
                for name, child in list(parent.named_children()):
                    if type(child) is nn.Linear:
                        child.qconfig = per_channel_dynamic_qconfig
                        setattr(parent, name, DynamicLinear.from_float(child))
                        count += 1
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a swapped layer's weight as a product reads them: int8 values, one fp32
    scale per output channel, the fp32 bias. (Its packed weights are no parameters.)"""
    w = module.weight()
    bias = module.bias()
    return w.numel() + 4 * w.shape[0] + (bias.numel() * bias.element_size() if bias is not None else 0)
