"""Peak tensor memory of a function, counted on the "meta" device (shapes only).

A GPU's peak allocated memory is, up to the allocator's rounding and library
workspaces, the largest sum of live tensor storages. `PeakLiveBytes` counts exactly that
for any function run on meta tensors: every storage an operation creates is added when
it appears and subtracted when it is freed (CPython frees it when its last view goes).
Storages that existed before (weights, inputs) are not counted. So the memory of a
model too large to run here (the paper preset's 4.2 B parameters) can be sized on a CPU
in a second, and a change that should lower it can be tested.

On the meta device `scaled_dot_product_attention` takes PyTorch's math path, which
materializes the [B, H, L, L] attention weights in fp32; a GPU runs a fused kernel that
allocates only the output. `fused_attention()` makes SDPA allocate as a fused kernel
does, for the count to be the GPU's.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakLiveBytes(TorchDispatchMode):
    """live / peak: bytes of the storages created inside the mode and still alive / at most.
    `ignore`: tensors whose storages are not counted (weights, inputs)."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._ignored = {id(t.untyped_storage()) for t in ignore}

    def _freed(self, key: int, n: int) -> None:
        self.live -= n
        self._sizes.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._sizes or key in self._ignored:
                continue  # a view, an in-place result, or a weight
            n = storage.nbytes()
            self._sizes[key] = n
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, n)
        return out


def _fused_sdpa(query, key, value, *args, **kwargs):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@contextlib.contextmanager
def fused_attention():
    """SDPA allocates only its output (as a GPU's fused kernels do); shapes only."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def no_mask_shortcuts():
    """transformers checks a padding mask's values to skip building a causal mask; meta
    tensors have none, so always build it (its memory is then counted too)."""
    import transformers.masking_utils as masking

    original = masking._ignore_causal_mask_sdpa
    masking._ignore_causal_mask_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        masking._ignore_causal_mask_sdpa = original


def peak_bytes(fn, *args, ignore=(), gpu_attention: bool = True) -> int:
    """Peak bytes of the tensors `fn(*args)` creates (meta tensors in, under no_grad)."""
    probe = PeakLiveBytes(ignore=(*ignore, *[a for a in args if isinstance(a, torch.Tensor)]))
    with contextlib.ExitStack() as stack:
        if gpu_attention:
            stack.enter_context(fused_attention())
        stack.enter_context(no_mask_shortcuts())
        stack.enter_context(torch.no_grad())
        stack.enter_context(probe)
        out = fn(*args)
        del out
    return probe.peak
