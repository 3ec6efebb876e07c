"""Batched image preprocessing: uint8 HWC arrays -> normalised [B, 3, S, S] tensor.

``preprocess_batch`` runs the native extension (kernels/preprocess: Pillow's bicubic
resize reproduced bit for bit, threads across images and rows, GIL released) and
``preprocess_batch_reference`` is its specification: the project's image path,
``vlv_engine.images.load_image`` + ``images.preprocess`` on Pillow and torch.  The
two agree exactly, not to a tolerance, so swapping one for the other never changes
an embedding.  Without the extension ``preprocess_batch`` logs a notice once and
returns the reference.

Inputs: HW (grey), HW1, HW3 (RGB) or HW4 (RGBA, composited on white like
``load_image``) uint8 numpy arrays of any sizes.  Arrays whose rows are not
contiguous are copied first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vlv_engine.images import ImageInputError, describe
from vlv_engine.native._loader import native, num_threads as _threads

if TYPE_CHECKING:
    import torch

__all__ = ["available", "preprocess_batch", "preprocess_batch_reference", "resize_batch", "simd_level"]


def available() -> bool:
    """Whether ``preprocess_batch`` runs natively here (extension built, not
    switched off with VLV_NATIVE=0, and reproducing the installed Pillow)."""
    return native().module is not None


def simd_level() -> str | None:
    """The instruction set the native CPU path uses ('avx2', 'sse4.1', 'scalar'), or None."""
    module = native().module
    return None if module is None else module.simd_level()


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        height = width = int(size)
    else:
        try:
            height, width = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or (height, width), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return height, width


def _mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    if mean_arr.shape != (3,) or std_arr.shape != (3,):
        raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
    if not np.all(std_arr != 0):
        raise ValueError(f"std must be non-zero, got {std!r}")
    return mean_arr, std_arr


def _check_dtype(dtype: torch.dtype) -> None:
    import torch

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")


def as_hwc(item: object, index: int) -> np.ndarray:
    """``item`` as a uint8 [H, W, C] array (C in 1, 3, 4) with contiguous rows, or
    ImageInputError naming it."""

    def fail(reason: str) -> ImageInputError:
        return ImageInputError(reason, source=describe(item), index=index)

    if not isinstance(item, np.ndarray):
        raise fail(f"expected a uint8 numpy array, got {type(item).__name__} (use vlv_engine.images.load_image)")
    if item.dtype != np.uint8:
        raise fail(f"dtype {item.dtype}, expected uint8")
    if item.ndim == 2:
        item = item[:, :, None]
    if item.ndim != 3:
        raise fail(f"expected HW or HWC, got {item.ndim} dimensions")
    if item.shape[2] not in (1, 3, 4):
        raise fail(f"needs 1, 3 or 4 channels in the last dimension, got {item.shape[2]}")
    if item.shape[0] == 0 or item.shape[1] == 0:
        raise fail(f"zero-size image: shape {tuple(item.shape)}")
    channels = item.shape[2]
    if (channels > 1 and item.strides[2] != 1) or item.strides[1] != channels or item.strides[0] < item.shape[1] * channels:
        item = np.ascontiguousarray(item)  # e.g. a crop with a step, a CHW array transposed to HWC
    return item


def _arrays(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        raise ValueError("images must be a list of arrays (one per image), not one array")
    return [as_hwc(item, i) for i, item in enumerate(images)]


def _lut(mean: np.ndarray, std: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """[3, 256]: what images.preprocess computes for each uint8 value, in `dtype`.
    Same float32 operations in the same order, then torch's own cast."""
    import torch

    x = np.broadcast_to(np.arange(256, dtype=np.float32), (3, 256)).copy()
    x /= np.float32(255.0)
    x -= mean[:, None]
    x /= std[:, None]
    return torch.from_numpy(x).to(dtype)


def preprocess_batch(
    images: Sequence[np.ndarray],
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype | None = None,
    *,
    num_threads: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Resize (Pillow bicubic, antialiased) and normalise uint8 HWC images into a
    ``[B, 3, H, W]`` tensor of ``dtype`` (float32, float16 or bfloat16; None: float32).

    ``size`` is an int (square) or ``(height, width)``.  ``num_threads`` defaults to
    $VLV_NATIVE_THREADS or the CPUs this process may use.  ``device``: where the
    result goes; on a CUDA device the CUDA kernels do the work when they were built
    (VLV_NATIVE_CUDA=1), else the CPU result is copied there.  Equal, bit for bit,
    to ``preprocess_batch_reference``; falls back to it (with a logged notice) when
    the extension is not available.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    height, width = _size(size)
    mean_arr, std_arr = _mean_std(mean, std)
    _check_dtype(dtype)
    arrays = _arrays(images)
    threads = _threads(num_threads)
    target = torch.device(device) if device is not None else torch.device("cpu")
    state = native()
    if state.module is None:
        return _reference(arrays, (height, width), mean_arr, std_arr, dtype).to(target)
    if target.type == "cuda":
        from vlv_engine.native import cuda

        if cuda.module() is not None:
            lut = _lut(mean_arr, std_arr, dtype)
            return cuda.preprocess_batch_cuda(arrays, (height, width), lut, state.order, target)

    out = torch.empty((len(arrays), 3, height, width), dtype=dtype)  # [B, 3, H, W]
    if not arrays:
        return out.to(target)
    bits = torch.int32 if out.element_size() == 4 else torch.int16  # raw bits: numpy has no bfloat16
    lut = _lut(mean_arr, std_arr, dtype).view(bits).numpy()
    state.module.resize_normalize(arrays, out.view(bits).numpy(), lut, state.order, threads)
    return out.to(target)


def preprocess_batch_reference(
    images: Sequence[np.ndarray],
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The specification of ``preprocess_batch``: ``images.load_image`` (grey and
    RGBA to RGB) then ``images.preprocess`` on Pillow + torch, one image at a time."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    height, width = _size(size)
    mean_arr, std_arr = _mean_std(mean, std)
    _check_dtype(dtype)
    return _reference(_arrays(images), (height, width), mean_arr, std_arr, dtype)


def _reference(arrays: list[np.ndarray], size: tuple[int, int], mean: np.ndarray, std: np.ndarray,
               dtype: torch.dtype) -> torch.Tensor:
    from vlv_engine import images as image_io

    loaded = [image_io.load_image(a, max_pixels=None, index=i) for i, a in enumerate(arrays)]
    return image_io.preprocess(loaded, size, tuple(mean.tolist()), tuple(std.tolist()), dtype=dtype, native=False)


def resize_batch(images: Sequence[np.ndarray], size: int | tuple[int, int], *,
                 num_threads: int | None = None) -> np.ndarray:
    """Resize uint8 HWC images to uint8 ``[B, H, W, 3]`` RGB, exactly as
    ``load_image(a).resize((W, H), BICUBIC, reducing_gap=None)``; natively when
    available, else with Pillow.  Imports no torch."""
    height, width = _size(size)
    arrays = _arrays(images)
    out = np.empty((len(arrays), height, width, 3), np.uint8)
    state = native()
    if state.module is not None and arrays:
        state.module.resize_u8(arrays, out, state.order, _threads(num_threads))
        return out
    from PIL import Image

    from vlv_engine import images as image_io

    for i, a in enumerate(arrays):
        rgb = image_io.load_image(a, max_pixels=None, index=i)
        out[i] = np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None))
    return out
