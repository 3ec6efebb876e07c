"""The single image input path of vlv-engine.

Every entry point (caption, embed, reconstruct, the CLI, the service, batch jobs)
turns user input into model input through this module, so the rules below are
the project's rules:

* ``load_image`` accepts PIL images, paths (``str`` / ``os.PathLike``), encoded
  bytes, numpy arrays and torch tensors, and returns a fully decoded, detached
  RGB ``PIL.Image.Image``.  Anything it cannot turn into a sensible RGB image is
  refused with an :class:`ImageInputError` naming the item and the reason.
* ``preprocess`` turns a list of such RGB images into the normalised
  ``[B, 3, H, W]`` tensor the models consume.

Decisions worth knowing (they are tested in ``tests/unit/test_images.py``):

* Transparency is composited onto white (what a viewer shows on a page).
* 16-bit data (``I;16*``, ``I``, ``uint16`` arrays) maps to 8-bit by ``v >> 8``;
  ``I`` is treated as 16-bit and clipped to ``[0, 65535]`` first.
* ``F`` images follow Pillow's own ``F -> L`` rule (0..255 scale, clipped); float
  numpy arrays / tensors are on the 0..1 scale and are rounded to nearest.
* Animated images: the first frame is used (the current frame for a PIL image a
  caller passes in, since seeking would mutate the caller's object).
* ``max_pixels`` applies to every kind of input, not only to files.
* Unreadable EXIF is logged and ignored (the image is kept unrotated): broken
  metadata is common and the pixels are usually fine.
* EPS is never opened: Pillow hands it to Ghostscript, a subprocess we do not
  want to run on untrusted input.

This module must stay cheap to import: torch is imported lazily, only when a
tensor is passed in or ``preprocess`` runs.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageInput",
    "ImageInputError",
    "describe",
    "load_batch",
    "load_image",
    "preprocess",
]

logger = logging.getLogger(__name__)

#: Largest ``width * height`` accepted by default: 64 Mi pixels (e.g. 8192x8192),
#: about 192 MiB once decoded to RGB.  That is far beyond any model input size
#: (Florence-2 uses 768x768) while keeping one image's memory bounded.  It is
#: also below Pillow's own ``Image.MAX_IMAGE_PIXELS`` (~89.5 M), so for files our
#: check, made on the header before any pixel is decoded, fires first; Pillow's
#: limit is left switched on as a second line of defence.
DEFAULT_MAX_PIXELS: int = 64 * 2**20

#: What ``load_image`` accepts (a string, so that torch is not imported here).
ImageInput: TypeAlias = (
    "Image.Image | str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | torch.Tensor"
)

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Ghostscript is run as a subprocess to rasterise EPS; not on untrusted input.
_REFUSED_FORMATS = frozenset({"EPS"})


class ImageInputError(ValueError):
    """One input item could not be turned into an RGB image.

    ``index`` is the item's position in the batch (None for a single image),
    ``source`` is :func:`describe` of the item, ``reason`` says what is wrong.
    """

    def __init__(self, reason: str, *, source: str, index: int | None = None) -> None:
        self.reason = reason
        self.source = source
        self.index = index
        # Paths are quoted so that spaces and odd characters stay visible;
        # "<...>" descriptions already read as placeholders.
        shown = source if source.startswith("<") else repr(source)
        where = f"image {index} ({shown})" if index is not None else f"image {shown}"
        super().__init__(f"{where}: {reason}")

    # Batch jobs send errors across processes; the default pickling would call
    # __init__ with the message only and fail.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.reason, self.source, self.index))


def _rebuild_error(
    cls: type[ImageInputError], reason: str, source: str, index: int | None
) -> ImageInputError:
    return cls(reason, source=source, index=index)


# Builds the ImageInputError for the item being loaded, from a reason.
_Fail = Callable[[str], ImageInputError]


def describe(item: object) -> str:
    """A short, log-safe description of an input item (the ``source`` of errors)."""
    if isinstance(item, (str, os.PathLike)):
        return os.fsdecode(item)
    if isinstance(item, Image.Image):
        return f"<PIL.Image {item.width}x{item.height} {item.mode}>"
    if isinstance(item, (bytes, bytearray, memoryview)):
        size = item.nbytes if isinstance(item, memoryview) else len(item)
        return f"<{type(item).__name__} len={size}>"
    if isinstance(item, np.ndarray):
        return f"<ndarray {item.dtype} {tuple(item.shape)}>"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(item, torch.Tensor):
        dtype = str(item.dtype).removeprefix("torch.")
        return f"<Tensor {dtype} {tuple(item.shape)}>"
    return f"<{type(item).__name__}>"


def load_image(
    item: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    index: int | None = None,
) -> Image.Image:
    """Turn one input item into a fully decoded RGB image of its own.

    Raises :class:`ImageInputError` for anything that is not a usable image,
    including images with more than ``max_pixels`` pixels (None: no limit of
    ours; Pillow's decompression-bomb limit still applies to files).  Never
    modifies a PIL image passed in and never returns the same object.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    source = describe(item)

    def fail(reason: str) -> ImageInputError:
        return ImageInputError(reason, source=source, index=index)

    if isinstance(item, Image.Image):
        return _from_pil(item, max_pixels, fail)
    if isinstance(item, (str, os.PathLike)):
        return _from_path(item, max_pixels, fail)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if not data:
            raise fail("empty input (0 bytes)")
        return _decode(io.BytesIO(data), max_pixels, fail)
    if isinstance(item, np.ndarray):
        return _from_array(item, max_pixels, fail)
    torch = sys.modules.get("torch")  # a tensor cannot exist unless torch is imported
    if torch is not None and isinstance(item, torch.Tensor):
        return _from_tensor(item, max_pixels, fail)
    raise fail(
        f"unsupported input type {type(item).__name__}; expected a PIL image, a path, "
        "bytes, a numpy array or a torch tensor"
    )


def load_batch(
    items: Iterable[ImageInput],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_error: Literal["raise", "collect"] = "raise",
) -> tuple[list[Image.Image | None], list[ImageInputError | None]]:
    """Load many items; returns ``(images, errors)``, aligned with ``items``.

    ``on_error="raise"`` raises the first :class:`ImageInputError` (its ``index``
    is the item's position).  ``on_error="collect"`` never stops on a bad item:
    its slot in ``images`` is None and its error is in ``errors``.
    """
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")
    images: list[Image.Image | None] = []
    errors: list[ImageInputError | None] = []
    for i, item in enumerate(items):
        try:
            images.append(load_image(item, max_pixels=max_pixels, index=i))
            errors.append(None)
        except ImageInputError as err:
            if on_error == "raise":
                raise
            images.append(None)
            errors.append(err)
        except Exception as exc:
            # In "collect" mode one item must not sink a job over millions of
            # files, even through a bug or a decoder we did not anticipate; the
            # traceback goes to the log so such cases still get noticed.
            if on_error == "raise":
                raise
            logger.warning("unexpected error loading image %d (%s)", i, describe(item), exc_info=True)
            images.append(None)
            errors.append(
                ImageInputError(
                    f"unexpected error ({type(exc).__name__}: {exc})", source=describe(item), index=i
                )
            )
    return images, errors


def preprocess(
    images: Sequence[Image.Image],
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    dtype: torch.dtype | None = None,
    native: bool | None = None,
) -> torch.Tensor:
    """Resize and normalise RGB images into a ``[B, 3, H, W]`` tensor.

    ``size`` is an int (square) or ``(height, width)``, the order of the output
    tensor's dimensions (not PIL's ``(width, height)``).  Each image is resized
    once, straight to ``size``, ignoring aspect ratio (no crop), as Florence-2's
    processor does.  Then ``x / 255``, ``(x - mean) / std`` in float32 and a final
    cast to ``dtype`` (None means float32; torch is not needed to call this
    module's signature, so the default is not ``torch.float32`` itself).

    Every step is per image, so row ``i`` is bit-identical whatever the batch.

    ``native`` None (default) uses the native extension (``vlv_engine.native``) when
    it is available, True requires it, False forces the Pillow path below.  Both
    give the same tensor bit for bit (tests/native check it).
    """
    import torch

    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    if mean_arr.shape != (3,) or std_arr.shape != (3,):
        raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
    if not np.all(std_arr != 0):
        raise ValueError(f"std must be non-zero, got {std!r}")

    for i, im in enumerate(images):
        if not isinstance(im, Image.Image) or im.mode != "RGB":
            raise ValueError(
                f"preprocess takes RGB PIL images (use load_image first); item {i} is {describe(im)}"
            )
    if native is not False:
        from vlv_engine import native as native_ops

        if native_ops.available():
            arrays = [np.asarray(im) for im in images]  # [H, W, 3] uint8 each
            return native_ops.preprocess_batch(arrays, (height, width), mean_arr, std_arr, dtype)
        if native:
            raise RuntimeError("the native extension is not available (see the log for why)")

    out = torch.empty((len(images), 3, height, width), dtype=torch.float32)
    for i, im in enumerate(images):
        # PIL bicubic on uint8 is the reference resize: the rest of the project
        # (later a native extension) is checked against exactly this call, so
        # keep the filter, the uint8 input and reducing_gap=None (no
        # reduce-then-resample shortcut) unchanged.
        resized = im.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None)
        x = np.asarray(resized, dtype=np.float32)  # HWC, a fresh writable array
        x /= np.float32(255.0)
        x -= mean_arr
        x /= std_arr
        out[i] = torch.from_numpy(x).permute(2, 0, 1)
    return out if dtype is None else out.to(dtype)


# --- sources ---------------------------------------------------------------


def _from_path(path: str | os.PathLike, max_pixels: int | None, fail: _Fail) -> Image.Image:
    try:
        # Opening the file ourselves keeps it closed on every error path,
        # including exceptions raised from inside Image.open.
        with open(path, "rb") as fp:
            if os.fstat(fp.fileno()).st_size == 0:
                raise fail("empty file (0 bytes)")
            return _decode(fp, max_pixels, fail)
    except FileNotFoundError:
        if "://" in os.fsdecode(path):
            raise fail("URLs are not fetched here; download the file and pass its path or bytes") from None
        raise fail("file not found") from None
    except IsADirectoryError:
        raise fail("is a directory, not a file") from None
    except PermissionError:
        raise fail("permission denied") from None
    except ImageInputError:
        raise
    except OSError as exc:
        raise fail(f"cannot read file ({type(exc).__name__}: {exc})") from exc


def _decode(fp: IO[bytes], max_pixels: int | None, fail: _Fail) -> Image.Image:
    try:
        # Image.open reads only the header; pixels are decoded by .load().
        opened = Image.open(fp, formats=_formats())
    except UnidentifiedImageError:
        raise fail("not a recognised image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives here if a warnings filter turned it into an error.
        raise fail(f"over Pillow's decompression-bomb pixel limit ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:
        raise fail(f"unreadable image header ({type(exc).__name__}: {exc})") from exc

    with opened as im:
        _check_size(im.width, im.height, max_pixels, fail)
        try:
            im.load()
        except Exception as exc:
            raise fail(f"truncated or corrupt file ({type(exc).__name__}: {exc})") from exc
        if logger.isEnabledFor(logging.DEBUG):
            _log_if_animated(im)
        # `im` is closed when this block ends (its pixel storage with it), so
        # the result must be a new image: caller_owned=True forces that.
        return _normalise(im, fail, caller_owned=True)


def _from_pil(im: Image.Image, max_pixels: int | None, fail: _Fail) -> Image.Image:
    _check_size(im.width, im.height, max_pixels, fail)
    try:
        im.load()  # a lazily opened image decodes here; pixels do not change
    except Exception as exc:
        raise fail(f"truncated or corrupt image ({type(exc).__name__}: {exc})") from exc
    return _normalise(im, fail, caller_owned=True)


def _from_tensor(t: torch.Tensor, max_pixels: int | None, fail: _Fail) -> Image.Image:
    torch = sys.modules["torch"]  # already imported: `t` is a tensor
    if t.ndim == 3:
        # CHW wins when both ends look like channels (e.g. 3x4x3): torch code
        # produces CHW; HWC mostly comes from decoders that return numpy anyway.
        if t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        elif t.shape[-1] not in (1, 3, 4):
            raise fail(f"tensor has no channel dimension of size 1, 3 or 4: shape {tuple(t.shape)}")
    elif t.ndim != 2:
        hint = " (a batch? pass images one by one)" if t.ndim == 4 else ""
        raise fail(f"tensor must be CHW, HWC or HW, got {t.ndim} dimensions{hint}")
    t = t.detach().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # numpy has no bfloat16; float32 holds both exactly
    return _from_array(t.numpy(), max_pixels, fail)


def _from_array(a: np.ndarray, max_pixels: int | None, fail: _Fail) -> Image.Image:
    if a.ndim not in (2, 3):
        raise fail(f"array must be HW or HWC, got {a.ndim} dimensions")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] not in (3, 4):
        hint = " (numpy arrays are read as HWC; this looks like CHW)" if a.shape[0] in (1, 3, 4) else ""
        raise fail(f"array must have 1, 3 or 4 channels in the last dimension, got {a.shape[-1]}{hint}")
    height, width = a.shape[:2]
    if height == 0 or width == 0:
        raise fail(f"zero-size image: shape {tuple(a.shape)}")
    _check_size(width, height, max_pixels, fail)

    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype.kind == "u" and a.dtype.itemsize == 2:  # either byte order
        u8 = (a >> 8).astype(np.uint8)  # scale, never clip, 16-bit to 8-bit
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise fail("array contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise fail(f"float values must be in [0, 1], got range [{lo:g}, {hi:g}]")
        u8 = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise fail(f"unsupported dtype {a.dtype}; use uint8 (0-255), uint16 or float in [0, 1]")

    # uint8 HW / HWx3 / HWx4 become L / RGB / RGBA.  fromarray may share the
    # caller's buffer; caller_owned=True makes the result a copy.
    return _normalise(Image.fromarray(np.ascontiguousarray(u8)), fail, caller_owned=True)


# --- shared steps ----------------------------------------------------------


def _formats() -> tuple[str, ...]:
    # Not cached: plugins registered later (e.g. a HEIF opener) are picked up.
    Image.init()
    return tuple(f for f in Image.OPEN if f not in _REFUSED_FORMATS)


def _check_size(width: int, height: int, max_pixels: int | None, fail: _Fail) -> None:
    if width <= 0 or height <= 0:
        raise fail(f"zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise fail(
            f"{width}x{height} = {width * height:,} pixels is over the pixel limit "
            f"(max_pixels={max_pixels:,})"
        )


def _log_if_animated(im: Image.Image) -> None:
    try:
        animated = bool(getattr(im, "is_animated", False))
    except Exception:  # finding frame 2 may hit a corrupt frame we never use
        return
    if animated:
        logger.debug("animated %s image: using the first frame only", im.format)


def _normalise(im: Image.Image, fail: _Fail, *, caller_owned: bool) -> Image.Image:
    """Apply EXIF orientation and convert to RGB; always returns a new image
    when ``caller_owned`` (the input must stay untouched and usable)."""
    try:
        transposed = ImageOps.exif_transpose(im)
    except Exception as exc:
        # Broken EXIF is common in the wild and the pixels are fine: keep the
        # image unrotated rather than refusing it.
        logger.warning("ignoring unreadable EXIF orientation (%s: %s)", type(exc).__name__, exc)
        transposed = None
    if transposed is not None and transposed is not im:
        im, caller_owned = transposed, False
    return _to_rgb(im, fail, caller_owned=caller_owned)


def _has_transparency(im: Image.Image) -> bool:
    # Image.has_transparency_data, which needs Pillow >= 10.1 (we allow 10.0).
    if "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A")


def _to_rgb(im: Image.Image, fail: _Fail, *, caller_owned: bool) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy() if caller_owned else im
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255; scale instead.
        values = np.asarray(im).astype(np.int64)
        u8 = (np.clip(values, 0, 0xFFFF) >> 8).astype(np.uint8)
        return Image.fromarray(u8).convert("RGB")
    try:
        if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and _has_transparency(im)):
            # convert("RGBA") also resolves RGBA palettes and tRNS colour keys.
            rgba = im.convert("RGBA")
            out = Image.new("RGB", rgba.size, _WHITE)
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        # 1, L, P, F, CMYK, YCbCr, LAB, HSV, RGBX...: Pillow's own conversions.
        # (Adobe CMYK JPEGs are often stored inverted; Pillow's JPEG decoder
        # already accounts for that, so no special case here.)
        return im.convert("RGB")
    except ValueError as exc:
        raise fail(f"unsupported image mode {mode!r} ({exc})") from exc
