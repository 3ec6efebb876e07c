"""The CUDA version of ``preprocess_batch`` (kernels/preprocess/resample_cuda.cu).

Built only with ``VLV_NATIVE_CUDA=1`` on a machine with nvcc; imported on first use
for a CUDA device, never at package import (no CUDA initialisation at import).
Same arithmetic as the CPU extension, so its output equals the reference bit for bit.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@functools.cache
def module() -> ModuleType | None:
    """vlv_engine.native._preprocess_cuda, or None when it was not built."""
    try:
        return importlib.import_module("vlv_engine.native._preprocess_cuda")
    except ImportError:
        return None


def preprocess_batch_cuda(arrays: list[np.ndarray], size: tuple[int, int], lut: torch.Tensor, order: int,
                          device: torch.device) -> torch.Tensor:
    """[B, 3, H, W] on ``device`` in ``lut.dtype``; ``arrays`` already checked (as_hwc)."""
    import torch

    ext = module()
    if ext is None:
        raise RuntimeError("the CUDA preprocessing kernels are not built (reinstall with VLV_NATIVE_CUDA=1)")
    height, width = size
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    out = torch.empty((len(arrays), 3, height, width), dtype=lut.dtype, device=device)  # [B, 3, H, W]
    lut_dev = lut.to(device)  # [3, 256]
    stream = torch.cuda.current_stream(device)
    ext.resize_normalize_cuda(arrays, out.data_ptr(), lut_dev.data_ptr(), out.element_size(), height, width, order,
                              index, stream.cuda_stream)
    # The kernels read lut_dev on `stream`; keep it alive until they have run.
    lut_dev.record_stream(stream)
    return out
