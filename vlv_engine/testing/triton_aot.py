"""Compile a planned Triton launch for a CUDA GPU on a machine without one.

Triton's CPU interpreter checks what a kernel computes, not whether it compiles for a GPU:
it accepts what ptxas would refuse, ignores shared memory and registers, and runs every
`tl.dot` on the CPU. This module gives each launch the GPU's compiler instead: the
launchers' own plan (`vlv_engine.ops._runtime.Launch`), specialized exactly as Triton's
JIT specializes a real launch (argument types, 16-byte alignment, integers equal to 1),
lowered to PTX and assembled by the ptxas that ships with Triton, for a chosen
architecture. What comes back is what decides whether the launch would run on that GPU
and how: shared memory against the architecture's limit, registers and spills, and
whether the dots became tensor-core instructions.

The tensors only lend their dtypes, strides and alignment (CPU tensors do): nothing
runs. It uses Triton's JIT internals (`create_function_from_signature`,
`JITFunction._pack_args`, Triton 3.4 and later).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# The most shared memory one block may use (the opt-in maximum, in bytes): the limit a
# launch is refused over ("out of resources: shared memory").
SHARED_LIMIT = {
    80: 166_912,  # A100, A30
    86: 101_376,  # RTX 30xx, A10, A40
    89: 101_376,  # RTX 40xx, L4, L40
    90: 232_448,  # H100, H200
}
ARCH_NAMES = {80: "A100", 86: "RTX 3090 / A10", 89: "RTX 4090 / L4", 90: "H100 / H200"}


@dataclass
class KernelReport:
    name: str
    arch: int
    shared_bytes: int
    registers: int | None  # per thread (None: cuobjdump missing)
    spill_bytes: int | None  # local memory per thread: registers spilled
    num_warps: int
    ptx: str

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.arch]

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit

    @property
    def tensor_core_ops(self) -> int:
        """How many tensor-core instructions the PTX holds (wgmma on sm_90, mma.sync before)."""
        return len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", self.ptx))

    def summary(self) -> str:
        regs = "?" if self.registers is None else self.registers
        spills = "?" if self.spill_bytes is None else self.spill_bytes
        return (f"{self.name} sm_{self.arch}: shared {self.shared_bytes} / {self.shared_limit} B, {regs} registers, "
                f"{spills} B spilled, {self.num_warps} warps, {self.tensor_core_ops} tensor-core ops")


def _jit_function(fn):
    """The plain JITFunction of a kernel, also when it was decorated under the interpreter."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    return triton.jit(fn.fn) if isinstance(fn, InterpretedFunction) else fn


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, local bytes) per thread, read from the cubin by Triton's cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=60).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(local.group(1)) if local else None)


def compile_launch(launch, arch: int) -> KernelReport:
    """Compile `launch` (a `Launch`) for sm_`arch` as Triton would on that GPU, without one.

    The launch must have been planned as for a GPU: outside the interpreter (no
    TRITON_INTERPRET), since the plan then upcasts bf16 for the interpreter's sake."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if arch not in SHARED_LIMIT:
        raise ValueError(f"unknown CUDA architecture sm_{arch}; known: {sorted(SHARED_LIMIT)}")
    fn = _jit_function(launch.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    registers, spills = _resource_usage(compiled.asm["cubin"])
    return KernelReport(name=compiled.metadata.name, arch=arch, shared_bytes=int(compiled.metadata.shared),
                        registers=registers, spill_bytes=spills, num_warps=int(compiled.metadata.num_warps),
                        ptx=compiled.asm["ptx"])
