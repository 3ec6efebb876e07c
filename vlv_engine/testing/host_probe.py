"""What a CUDA graph capture assumes of a function, observable on the CPU.

Run the function on the "meta" device (shapes only, no CPU fallback) inside
`HostTensorProbe`: every aten operation is recorded, with each CPU tensor it reads. A
capturable step reads none (a host tensor is copied to the GPU, or passed as a kernel
argument, and frozen at capture) and calls no operation that syncs with the host.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SYNC_OPS = frozenset({"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"})


class HostTensorProbe(TorchDispatchMode):
    """ops: every aten operation run; host_args: (operation, shape) of each CPU tensor read."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.host_args: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        self.host_args += [(str(func), tuple(a.shape)) for a in tree_flatten((args, kwargs))[0]
                           if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
        return func(*args, **kwargs)

    @property
    def syncs(self) -> set[str]:
        return SYNC_OPS & set(self.ops)
