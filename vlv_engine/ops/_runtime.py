"""Where Triton can run, and which backend a tensor gets.

Nothing here imports triton at module import: `import vlv_engine.ops` works (and the
ops fall back to their references) on machines without triton.

Backend rule (read at every call, so tests and engines can switch it per process):
- CUDA tensors: the Triton kernel when triton imports, else the reference.
- CPU tensors: the Triton kernel, run by Triton's interpreter, only when both
  ``TRITON_INTERPRET=1`` and ``VLV_TRITON_ON_CPU=1`` are set; else the reference.
  The interpreter is for checking kernels, not for speed (milliseconds per program),
  so a process-wide ``TRITON_INTERPRET=1`` alone never slows the CPU path down.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
ON_CPU_ENV = "VLV_TRITON_ON_CPU"


@functools.cache
def _triton() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install raising anything at import
        return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether Triton kernels launched now run in Triton's CPU interpreter."""
    return _env_flag(INTERPRET_ENV)


def available() -> bool:
    """Whether a Triton kernel can run in this process: triton imports and there is a
    GPU, or the interpreter is on. Never raises."""
    if _triton() is None:
        return False
    try:
        return interpreting() or torch.cuda.is_available()
    except Exception:
        return False


def backend_for(t: torch.Tensor) -> str:
    """'triton' or 'reference': the backend the vlv ops use for a tensor on t's device."""
    if t.device.type == "cuda":
        return "triton" if _triton() is not None else "reference"
    if t.device.type == "cpu" and interpreting() and _env_flag(ON_CPU_ENV) and _triton() is not None:
        return "triton"
    return "reference"


_flavours: dict[tuple[int, bool], Any] = {}


def kernel(jit_fn: Any) -> Any:
    """The @triton.jit kernel in the flavour TRITON_INTERPRET asks for *now*.

    triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is
    first imported; re-wrapping the plain function here makes the launch independent
    of import order (tests switch the interpreter on per test, not per process).
    For this to hold, kernels call no @triton.jit function, triton.language's own
    included (tl.sum, tl.zeros, ...: see vlv_engine/ops/triton/layer_norm.py).
    """
    from triton.runtime.interpreter import InterpretedFunction

    want = interpreting()
    if isinstance(jit_fn, InterpretedFunction) == want:
        return jit_fn
    key = (id(jit_fn), want)
    if key not in _flavours:
        triton = _triton()
        _flavours[key] = InterpretedFunction(jit_fn.fn) if want else triton.jit(jit_fn.fn)
    return _flavours[key]


@dataclass
class Launch:
    """One kernel launch, planned but not run: the @triton.jit kernel, its grid, its
    arguments and its meta-parameters (constexprs, num_warps, num_stages).

    The launchers plan with the same function they run from, so what
    `vlv_engine.testing.triton_aot` compiles ahead of time for a GPU is exactly what a
    GPU would be given."""

    fn: Any  # the @triton.jit kernel as its module defines it
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def run(self) -> None:
        kernel(self.fn)[self.grid](*self.args, **self.kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision matching what torch does for the same dtype on CUDA:
    fp32 stays IEEE unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_in_kernel(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 dots on raw uint16 bits: kernels upcast bf16 loads
    to fp32 there. On a GPU bf16 stays bf16 (tensor cores)."""
    return dtype == torch.bfloat16 and interpreting()


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with a unit stride along N: a view when the leading dims
    collapse (any row stride is fine for the kernels), else a contiguous copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
