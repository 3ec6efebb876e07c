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

Compiling them: PyTorch's own layer passes its packed-weight object (a TorchScript
class) to the kernel, and torch.compile cannot trace that argument, so a model holding
PyTorch's layers runs eagerly. `FbgemmLinear` is that layer with its product registered
as the op ``vlv::fbgemm_int8_linear(x, layer, out_features)``: the packed weights stay on
the module, and the op finds them by the layer's number (`layer`, unique per process,
never reused). A compiled graph then calls fbgemm as one opaque op and fuses everything
between two products (norms, residual adds, activations, layout copies). Measured on the
small preset, compiled against eager in one process (benchmarks/README.md): 32 tokens
of 8 captions x 4 beams 7.25 -> 5.71 s, the int8 encoder path 0.86-0.91x the time.

What they cost besides: the per-call activation quantization moves results more than
weight-only int8 does (each user states its measured agreement).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear


def _engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def unavailable_reason() -> str:
    """Why the kernels cannot run in this PyTorch build ("" when they can)."""
    engines = _engines()
    if not {"fbgemm", "x86"} & set(engines) or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return f"it needs PyTorch's fbgemm/x86 quantized engine; this build has {engines}"
    return ""


# --------------------------------------------------------------------------- the op

# Layer number -> weak reference to its module. The module holds the packed weights (a
# state-dict load replaces them there); numbers come from a counter, so a compiled graph
# holding the number of a freed layer fails with a clear error instead of reaching
# another layer's weights.
_LAYERS: dict[int, weakref.ref] = {}
_NUMBERS = itertools.count(1)


def _packed_weights(layer: int):
    ref = _LAYERS.get(layer)
    module = ref() if ref is not None else None
    if module is None:
        raise RuntimeError(f"vlv::fbgemm_int8_linear: int8 layer {layer} no longer exists (its module was freed); "
                           "a compiled function that still calls it belongs to a discarded model")
    return module._packed_params._packed_params


def _fbgemm_linear(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    # reduce_range: 7-bit activations, PyTorch's choice for this layer on x86 (see above).
    return torch.ops.quantized.linear_dynamic(x, _packed_weights(layer), True)


_LIB = torch.library.Library("vlv", "FRAGMENT")
_LIB.define("fbgemm_int8_linear(Tensor x, int layer, int out_features) -> Tensor")
_LIB.impl("fbgemm_int8_linear", _fbgemm_linear, "CPU")
fbgemm_int8_linear = torch.ops.vlv.fbgemm_int8_linear.default


@torch.library.register_fake("vlv::fbgemm_int8_linear")
def _(x, layer, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class FbgemmLinear(DynamicLinear):
    """PyTorch's dynamic int8 linear (`torch.ao.nn.quantized.dynamic.Linear`: the same
    weights, state dict and results) whose product torch.compile can trace."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._number()

    def _number(self) -> None:
        self.layer = next(_NUMBERS)
        _LAYERS[self.layer] = weakref.ref(self)
        weakref.finalize(self, _LAYERS.pop, self.layer, None)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._number()  # a copy (deepcopy, unpickling) is a layer of its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return fbgemm_int8_linear(x, self.layer, self.out_features)
        # Eager: the kernel without the dispatcher's Python round trip.
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, True)


def is_dynamic_int8(module: nn.Module) -> bool:
    return isinstance(module, DynamicLinear)


def swap_linears(roots: Iterable[nn.Module]) -> int:
    """Replace every plain `nn.Linear` under `roots` (in place) by its dynamic int8 version
    (`FbgemmLinear`); returns how many were replaced. Subclasses of nn.Linear (e.g.
    attention's NonDynamicallyQuantizableLinear) stay float."""
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
                        setattr(parent, name, FbgemmLinear.from_float(child))
                        count += 1
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a swapped layer's weight as a product reads them: int8 values, one fp32
    scale per output channel, the fp32 bias. (Its packed weights are no parameters.)"""
    w = module.weight()
    bias = module.bias()
    return w.numel() + 4 * w.shape[0] + (bias.numel() * bias.element_size() if bias is not None else 0)
