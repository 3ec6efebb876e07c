"""Linear layers over int8 weights for CPU decode (the "int8_cpu" quantization scheme).

``int8_weight_linear(x, weight, scale, bias)`` is ``x @ (scale[:, None] * weight).T +
bias`` with int8 ``weight`` [N, K], one fp32 ``scale`` per output row and float32
activations. It runs the native kernel (kernels/gemv, AVX2 + FMA, a persistent thread
pool, the GIL released) and is registered as the custom op ``vlv::int8_weight_linear``
with a fake implementation, so a compiled decode step traces through it.
``int8_weight_linear_reference`` is its plain-PyTorch specification;
``Int8Linear`` holds the quantized weights in place of an ``nn.Linear``.

Why a kernel of our own: a decode step at batch 1 reads every weight once, so its time
is the bytes read, and int8 weights are a quarter of fp32's. On CPUs without
AVX512-VNNI, PyTorch's int8 weight-only path (torchao's) materializes the float weight
first and ends up slower than fp32 (cpu-facts.md). This kernel widens each weight in
registers just before its multiply-add.

Unlike the rest of ``vlv_engine.native`` this module imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from vlv_engine.native._loader import BUILD_HINT, DISABLE_ENV, _disabled_by_env

__all__ = ["Int8Linear", "available", "int8_weight_linear",
           "int8_weight_linear_reference", "kernel_threads", "quantize_rows", "unavailable_reason"]


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    if _disabled_by_env():
        return None, f"{DISABLE_ENV}=0 in the environment"
    try:
        return importlib.import_module("vlv_engine.native._gemv"), ""
    except ImportError as exc:
        return None, f"the native extension's int8 kernel is not built ({exc}); {BUILD_HINT}"


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why the kernel cannot run here ("" when it can)."""
    return _load()[1]


def simd_level() -> str | None:
    """The kernel's row loop on this CPU: "avx512", "avx2" or "scalar" (None: not built)."""
    module = _load()[0]
    return None if module is None else module.simd_level()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q [N, K] int8 in [-127, 127], scale [N] fp32) with
    weight ~= scale[:, None] * q."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_weight_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                                 bias: torch.Tensor | None) -> torch.Tensor:
    """The specification: dequantize, then a float32 linear layer."""
    return F.linear(x, weight.float() * scale[:, None], bias)


def _int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"vlv::int8_weight_linear: {reason}")
    if x.dtype != torch.float32 or weight.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError(f"vlv::int8_weight_linear takes float32 x, int8 weight and float32 scale; got "
                        f"{x.dtype}, {weight.dtype}, {scale.dtype}")
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("vlv::int8_weight_linear is inference only (the int8_cpu scheme): no gradient flows "
                           "through it; call it under torch.no_grad() or torch.inference_mode()")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"vlv::int8_weight_linear: x has {x.shape[-1]} input features, the weight {k}")
    # Rows are flattened on numpy views (a third of torch's reshape cost; ~100 calls a token).
    x2 = _array(x, contiguous=False).reshape(-1, k)
    if x2.strides[-1] != x2.itemsize:  # the kernel takes any row stride, not a column stride
        x2 = numpy.ascontiguousarray(x2)
    y = torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
    module.int8_linear(x2, _array(weight), _array(scale), None if bias is None else _array(bias),
                       y.numpy().reshape(-1, n), _threads())
    return y


def _array(t: torch.Tensor, contiguous: bool = True) -> numpy.ndarray:
    # A numpy view; detach/contiguous only when needed (~100 calls per decode step).
    if t.requires_grad:
        t = t.detach()
    return t.contiguous().numpy() if contiguous and not t.is_contiguous() else t.numpy()


# Defined with the low-level torch.library API rather than `@custom_op`: custom_op puts a
# Python autograd wrapper in front of the kernel, a second Python round trip on each of a
# decode token's ~100 calls. Measured on the compiled int8_cpu decode of the small preset,
# the two registrations side by side in one process: 26.3 -> 24.5 ms/token (median of 14
# alternating runs; this op faster in 12). Inference only: no autograd formula, so a
# call that would need one fails (`_int8_weight_linear`).
_LIB = torch.library.Library("vlv", "FRAGMENT")
_LIB.define("int8_weight_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor")


def _cpu_kernel(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _int8_weight_linear(x, weight, scale, bias)  # looked up per call: tests wrap it


_LIB.impl("int8_weight_linear", _cpu_kernel, "CPU")
int8_weight_linear = torch.ops.vlv.int8_weight_linear.default


@functools.cache
def _threads_override() -> int:
    return int(os.environ.get("VLV_GEMV_THREADS", "0"))


_held_threads: int | None = None  # set by kernel_threads(): torch runs on one thread meanwhile


def _threads() -> int:
    # The override is read once: this runs ~100-170 times per decode step.
    return _threads_override() or _held_threads or torch.get_num_threads()


@contextlib.contextmanager
def kernel_threads() -> Iterator[None]:
    """Give the cores to this kernel's pool: torch's own ops run on one thread inside.

    Why: after each parallel region PyTorch's OpenMP workers spin-wait for the next one,
    on the same cores this kernel's pool needs a few microseconds later. In a decode
    step, where the int8 products are most of the time and torch's ops (norms,
    rotary, attention over one token) are tiny, that contention cost ~25 % of the step
    on a 2-core machine (52 -> 40 ms per token at batch 1, small preset). The kernel
    keeps the thread count torch had on entry.

    Process-global (it changes ``torch.set_num_threads``) and not reentrant across
    threads: wrap one decode loop at a time, as ``StaticDecoder`` does."""
    global _held_threads
    n = torch.get_num_threads()
    if n == 1 or _held_threads is not None:
        yield
        return
    _held_threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _held_threads = None


def _linear_fn():
    # Compiling: the registered op, which torch.compile traces as one opaque call. Eager:
    # the same function without the dispatcher's Python round trip, ~25 us of a decode
    # step's ~100 calls (a k/v projection itself takes ~5 us).
    return int8_weight_linear if torch.compiler.is_compiling() else _int8_weight_linear


@torch.library.register_fake("vlv::int8_weight_linear")
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for inference only (no backward): int8 weight [N, K] and fp32
    scale [N] (frozen parameters, so they count as the layer's weight bytes), optional
    fp32 bias. (An attention's q/k/v and an MLP's gate/up arrive here already fused into
    one layer, `vlv_engine.engine.fused_projections`: one kernel call each.)"""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, scale = quantize_rows(linear.weight)
        out.weight.data, out.scale.data = q.to(linear.weight.device), scale.to(linear.weight.device)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().float().clone()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear_fn()(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
