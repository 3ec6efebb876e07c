"""Tests for vlv_engine.images: every fixture is generated in tmp_path."""

from __future__ import annotations

import io
import logging
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlv_engine import images
from vlv_engine.images import (
    DEFAULT_MAX_PIXELS,
    ImageInputError,
    describe,
    load_batch,
    load_image,
    preprocess,
)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def px(im: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(im.getpixel(xy))


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def save(im: Image.Image, path: Path, **kwargs: object) -> Path:
    im.save(path, **kwargs)
    return path


def noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    # Incompressible pixels, so that half of an encoded file is half of its data.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A real 1x1 1-bit PNG whose IHDR claims width x height (CRC fixed up)."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def error_of(item: object, **kwargs: object) -> ImageInputError:
    with pytest.raises(ImageInputError) as info:
        load_image(item, **kwargs)  # type: ignore[arg-type]
    return info.value


# --- modes -------------------------------------------------------------------


def test_rgb_is_returned_as_a_new_image() -> None:
    src = Image.new("RGB", (3, 2), RED)
    out = load_image(src)
    assert out is not src and out.mode == "RGB" and out.size == (3, 2)
    out.putpixel((0, 0), BLUE)
    assert px(src) == RED


def test_rgba_transparent_becomes_white_and_caller_image_untouched() -> None:
    src = Image.new("RGBA", (4, 1), (255, 0, 0, 0))
    src.putpixel((1, 0), (255, 0, 0, 255))
    src.putpixel((2, 0), (0, 0, 0, 128))
    before = src.tobytes()
    out = load_image(src)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == WHITE
    assert px(out, (1, 0)) == RED
    assert close(px(out, (2, 0)), (127, 127, 127), 1)  # half-transparent black on white
    assert src.mode == "RGBA" and src.tobytes() == before


def test_la() -> None:
    src = Image.new("LA", (2, 1), (0, 0))
    src.putpixel((1, 0), (0, 255))
    out = load_image(src)
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == BLACK


def _palette_image(mode: str) -> Image.Image:
    im = Image.new(mode, (2, 1), 0 if mode == "P" else (0, 255))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    return im


def test_p_with_transparency_pil_and_png(tmp_path: Path) -> None:
    src = _palette_image("P")
    src.putpixel((1, 0), 1)
    src.info["transparency"] = 0
    out = load_image(src)
    assert px(out, (0, 0)) == WHITE and px(out, (1, 0)) == BLUE
    from_file = load_image(save(src, tmp_path / "p.png", transparency=0))
    assert px(from_file, (0, 0)) == WHITE and px(from_file, (1, 0)) == BLUE


def test_p_with_rgba_palette() -> None:
    src = Image.new("RGBA", (2, 2), (255, 0, 0, 0)).quantize()
    assert src.mode == "P" and "transparency" not in src.info
    assert px(load_image(src)) == WHITE


def test_p_without_transparency() -> None:
    src = _palette_image("P")
    assert px(load_image(src)) == RED


def test_pa() -> None:
    src = _palette_image("PA")
    src.putpixel((1, 0), (1, 0))
    out = load_image(src)
    assert px(out, (0, 0)) == RED and px(out, (1, 0)) == WHITE


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, WHITE),
        ("1", 0, BLACK),
        ("F", 100.0, (100, 100, 100)),  # Pillow's F -> L rule: 0..255 scale
        ("F", 300.0, WHITE),  # ... clipped
        ("CMYK", (0, 255, 255, 0), RED),
        ("HSV", (0, 255, 255), RED),
    ],
)
def test_modes_converted_by_pillow(mode: str, value: object, expected: tuple[int, ...]) -> None:
    out = load_image(Image.new(mode, (2, 2), value))  # type: ignore[arg-type]
    assert out.mode == "RGB" and px(out) == expected


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
@pytest.mark.parametrize(
    ("value", "expected"),
    # Scaled by >> 8, not clipped: clipping would turn 0x00FF into 255.
    [(0xFF00, 255), (0xFFFF, 255), (0x8000, 128), (0x00FF, 0), (0x0100, 1)],
)
def test_16_bit_grey_is_scaled(mode: str, value: int, expected: int) -> None:
    assert px(load_image(Image.new(mode, (2, 2), value))) == (expected,) * 3


def test_16_bit_png_file(tmp_path: Path) -> None:
    arr = np.array([[0xFF00, 0x8000]], dtype=np.uint16)
    src = Image.fromarray(arr)
    path = save(src, tmp_path / "g16.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = load_image(path)
    assert px(out, (0, 0)) == (255,) * 3 and px(out, (1, 0)) == (128,) * 3


@pytest.mark.parametrize(("value", "expected"), [(0xFF00, 255), (0x8000, 128), (70000, 255), (-5, 0)])
def test_mode_i_is_treated_as_16_bit(value: int, expected: int) -> None:
    assert px(load_image(Image.new("I", (1, 1), value))) == (expected,) * 3


def test_ycbcr_and_lab() -> None:
    rgb = Image.new("RGB", (2, 2), (200, 100, 50))
    assert close(px(load_image(rgb.convert("YCbCr"))), (200, 100, 50), 3)
    lab = load_image(Image.new("LAB", (2, 2), (128, 128, 128)))
    assert lab.mode == "RGB" and lab.size == (2, 2)


def test_cmyk_jpeg_file(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert close(px(load_image(path), (8, 8)), RED, 8)


def test_unsupported_mode_is_reported() -> None:
    err = error_of(Image.new("La", (2, 2)))
    assert "unsupported image mode 'La'" in err.reason


# --- orientation, animation ----------------------------------------------------


def _half_red_half_blue() -> Image.Image:
    im = Image.new("RGB", (20, 10), BLUE)
    im.paste(RED, (0, 0, 10, 10))  # left half red
    return im


@pytest.mark.parametrize(
    ("orientation", "red_at", "blue_at"),
    # 6: the camera was turned clockwise, display rotates 90 deg clockwise: left -> top.
    # 8: the other way: left -> bottom.
    [(6, (5, 4), (5, 15)), (8, (5, 15), (5, 4))],
)
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_orientation(
    tmp_path: Path, orientation: int, red_at: tuple[int, int], blue_at: tuple[int, int], fmt: str
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(_half_red_half_blue(), tmp_path / f"o{orientation}.{fmt}", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (10, 20)
    assert close(px(out, red_at), RED, 12) and close(px(out, blue_at), BLUE, 12)


def test_exif_orientation_on_pil_input_leaves_caller_image_alone(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(_half_red_half_blue(), tmp_path / "o.png", exif=exif)
    with Image.open(path) as src:
        out = load_image(src)
        assert out.size == (10, 20) and src.size == (20, 10)
        assert src.getexif()[0x0112] == 6


@pytest.mark.parametrize("fmt", ["gif", "png", "webp"])
def test_animated_takes_first_frame(tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    path = save(frames[0], tmp_path / f"anim.{fmt}", save_all=True, append_images=frames[1:], lossless=True)
    with Image.open(path) as check:
        assert check.n_frames == 3
    with caplog.at_level(logging.DEBUG, logger="vlv_engine.images"):
        out = load_image(path)
    assert out.size == (8, 8) and close(px(out, (4, 4)), RED, 2)
    assert "first frame" in caplog.text


# --- files and bytes -------------------------------------------------------------


def test_path_str_path_and_bytes(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (5, 4), GREEN), tmp_path / "g.png")
    for item in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        out = load_image(item)
        assert out.size == (5, 4) and px(out) == GREEN


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = error_of(path, index=3)
    assert err.index == 3 and err.source == str(path) and "empty file" in err.reason
    assert str(err) == f"image 3 ({str(path)!r}): empty file (0 bytes)"
    assert "0 bytes" in error_of(b"").reason


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert error_of(path).reason == "not a recognised image file"
    assert error_of(b"hello").reason == "not a recognised image file"


def test_eps_is_never_opened(tmp_path: Path) -> None:
    path = tmp_path / "x.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert error_of(path).reason == "not a recognised image file"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.png").reason == "file not found"
    assert "directory" in error_of(tmp_path).reason
    assert "URLs are not fetched" in error_of("https://example.com/x.jpg").reason
    assert "<memoryview len=3>" == describe(memoryview(b"abc"))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    path = save(noise(), tmp_path / f"full.{fmt}", format=fmt.upper(), quality=90)
    data = path.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    err = error_of(cut, index=0)
    assert err.reason.startswith("truncated or corrupt file (")
    assert "truncated or corrupt file" in str(err) and str(cut) in str(err)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    # The same bytes in memory, and a lazily opened PIL image, fail the same way.
    assert "truncated or corrupt" in error_of(data[: len(data) // 2]).reason
    with Image.open(cut) as lazy:
        assert "truncated or corrupt" in error_of(lazy).reason


def test_header_bomb_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # Under Pillow's own limit, over ours: our header check refuses it.
    err = error_of(png_with_header_size(tmp_path / "b1.png", 4000, 4000), max_pixels=1_000_000)
    assert "pixel limit" in err.reason and "4000x4000" in err.reason
    # Over Pillow's hard limit: Pillow refuses it in Image.open; same kind of reason.
    err = error_of(png_with_header_size(tmp_path / "b2.png", 20000, 20000))
    assert "pixel limit" in err.reason and "DecompressionBombError" in err.reason
    err = error_of(png_with_header_size(tmp_path / "b3.png", 20000, 20000), max_pixels=None)
    assert "pixel limit" in err.reason


def test_bomb_warning_turned_into_error_is_reported(tmp_path: Path) -> None:
    path = png_with_header_size(tmp_path / "b.png", 10000, 10000)  # between Pillow's two limits
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        err = error_of(path, max_pixels=None)
    assert "pixel limit" in err.reason and "DecompressionBombWarning" in err.reason


def test_max_pixels_for_ordinary_images(tmp_path: Path) -> None:
    im = Image.new("RGB", (100, 100), RED)
    path = save(im, tmp_path / "r.png")
    arr = np.zeros((100, 100, 3), np.uint8)
    for item in (im, path, arr, torch.zeros(3, 100, 100, dtype=torch.uint8)):
        assert load_image(item, max_pixels=10_000).size == (100, 100)
        assert "pixel limit" in error_of(item, max_pixels=9_999).reason
    assert DEFAULT_MAX_PIXELS == 64 * 2**20
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(im, max_pixels=0)


# --- numpy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 5), 77, np.uint8), (77, 77, 77)),
        (np.full((4, 5, 1), 77, np.uint8), (77, 77, 77)),
        (np.broadcast_to(np.array(RED, np.uint8), (4, 5, 3)), RED),
        (np.zeros((4, 5, 4), np.uint8), WHITE),  # fully transparent
        (np.broadcast_to(np.array([0, 0, 255, 255], np.uint8), (4, 5, 4)), BLUE),
        (np.full((4, 5, 3), 0x8000, np.uint16), (128, 128, 128)),
        (np.full((4, 5, 3), 0xFF00, np.dtype(">u2")), (255, 255, 255)),
        (np.full((4, 5, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((4, 5), 1.0, np.float64), WHITE),
        (np.full((4, 5, 3), 0.2, np.float16), (51, 51, 51)),
    ],
)
def test_numpy_accepted(array: np.ndarray, expected: tuple[int, ...]) -> None:
    out = load_image(array)
    assert out.mode == "RGB" and out.size == (5, 4) and px(out) == expected


def test_numpy_result_does_not_share_memory() -> None:
    arr = np.zeros((2, 2, 3), np.uint8)
    out = load_image(arr)
    arr[:] = 255
    assert px(out) == BLACK


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros(5, np.uint8), "1 dimensions"),
        (np.zeros((1, 4, 5, 3), np.uint8), "4 dimensions"),
        (np.zeros((4, 5, 2), np.uint8), "got 2"),
        (np.zeros((3, 8, 8), np.uint8), "looks like CHW"),
        (np.zeros((0, 5, 3), np.uint8), "zero-size"),
        (np.zeros((4, 0), np.uint8), "zero-size"),
        (np.full((4, 5), np.nan, np.float32), "NaN"),
        (np.full((4, 5), np.inf, np.float32), "NaN or infinite"),
        (np.full((4, 5), 1.5, np.float32), "[0, 1]"),
        (np.full((4, 5), -0.1, np.float64), "[0, 1]"),
        (np.zeros((4, 5), np.int64), "unsupported dtype int64"),
        (np.zeros((4, 5), bool), "unsupported dtype bool"),
    ],
)
def test_numpy_rejected(array: np.ndarray, reason: str) -> None:
    err = error_of(array, index=7)
    assert reason in err.reason and err.index == 7
    assert err.source == f"<ndarray {array.dtype} {array.shape}>"


# --- torch -------------------------------------------------------------------------


def _chw_red(dtype: torch.dtype, channels: int = 3) -> torch.Tensor:
    t = torch.zeros(channels, 6, 5, dtype=dtype)
    t[0] = 255 if dtype == torch.uint8 else 1.0
    if channels == 4:
        t[3] = 255 if dtype == torch.uint8 else 1.0
    return t


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (_chw_red(torch.uint8), RED),
        (_chw_red(torch.uint8).permute(1, 2, 0), RED),  # HWC (6x5x3), non-contiguous view
        (_chw_red(torch.uint8).permute(1, 2, 0).contiguous(), RED),
        (_chw_red(torch.uint8, 4), RED),
        (torch.zeros(4, 6, 5, dtype=torch.uint8), WHITE),  # RGBA, transparent
        (torch.full((1, 6, 5), 77, dtype=torch.uint8), (77, 77, 77)),
        (torch.full((6, 5), 77, dtype=torch.uint8), (77, 77, 77)),
        (_chw_red(torch.float32), RED),
        (_chw_red(torch.float64), RED),
        (_chw_red(torch.float16), RED),
        (_chw_red(torch.bfloat16), RED),
        (torch.full((3, 6, 5), 0.5, requires_grad=True), (128, 128, 128)),
    ],
)
def test_tensor_accepted(tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    out = load_image(tensor)
    assert out.mode == "RGB" and out.size == (5, 6) and px(out) == expected


def test_tensor_ambiguous_layout_is_chw() -> None:
    t = torch.zeros(3, 5, 3, dtype=torch.uint8)  # CHW 5x3 or HWC 3x5
    assert load_image(t).size == (3, 5)


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        (torch.zeros(1, 3, 4, 5, dtype=torch.uint8), "a batch?"),
        (torch.zeros(5, dtype=torch.uint8), "1 dimensions"),
        (torch.zeros(5, 6, 7, dtype=torch.uint8), "no channel dimension"),
        (torch.zeros(2, 4, 5, dtype=torch.uint8), "no channel dimension"),
        (torch.zeros(3, 0, 5, dtype=torch.uint8), "zero-size"),
        (torch.full((3, 4, 5), 2.0), "[0, 1]"),
        (torch.full((3, 4, 5), float("nan")), "NaN"),
        (torch.zeros(3, 4, 5, dtype=torch.int64), "unsupported dtype int64"),
    ],
)
def test_tensor_rejected(tensor: torch.Tensor, reason: str) -> None:
    err = error_of(tensor)
    assert reason in err.reason
    assert err.source == f"<Tensor {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}>"


def test_module_import_does_not_import_torch() -> None:
    # Load images.py on its own: the package __init__ may import torch for
    # other reasons, and this checks only this module's promise.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('images_alone', {images.__file__!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'torch' not in sys.modules, 'images.py imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- errors, describe, batches ------------------------------------------------------


def test_describe() -> None:
    assert describe(Path("/data/x.jpg")) == "/data/x.jpg"
    assert describe(Image.new("RGBA", (3000, 2000))) == "<PIL.Image 3000x2000 RGBA>"
    assert describe(np.zeros((64, 64, 3), np.uint8)) == "<ndarray uint8 (64, 64, 3)>"
    assert describe(torch.zeros(3, 8, 8)) == "<Tensor float32 (3, 8, 8)>"
    assert describe(b"abc") == "<bytes len=3>"
    assert describe(42) == "<int>"


def test_error_message_and_pickling() -> None:
    err = ImageInputError("truncated or corrupt file (OSError: x)", source="/data/x.jpg", index=3)
    assert str(err) == "image 3 ('/data/x.jpg'): truncated or corrupt file (OSError: x)"
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.index, copy.source, copy.reason, str(copy)) == (3, "/data/x.jpg", err.reason, str(err))
    anon = ImageInputError("bad", source="<PIL.Image 2x2 La>")
    assert str(anon) == "image <PIL.Image 2x2 La>: bad" and anon.index is None
    assert "unsupported input type int" in error_of(42).reason


def _mixed_items(tmp_path: Path) -> list[object]:
    good = save(Image.new("RGB", (4, 4), GREEN), tmp_path / "good.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return [good, empty, Image.new("L", (3, 3), 9), np.zeros((4, 4, 2), np.uint8), b"text", good.read_bytes()]


def test_load_batch_collect(tmp_path: Path) -> None:
    items = _mixed_items(tmp_path)
    imgs, errs = load_batch(items, on_error="collect")
    assert len(imgs) == len(errs) == len(items)
    assert [im is not None for im in imgs] == [True, False, True, False, False, True]
    assert [e is None for e in errs] == [im is not None for im in imgs]
    assert px(imgs[0]) == GREEN and px(imgs[2]) == (9, 9, 9) and px(imgs[5]) == GREEN
    assert [(e.index, e.reason.split(" (")[0]) for e in errs if e is not None] == [
        (1, "empty file"),
        (3, "array must have 1, 3 or 4 channels in the last dimension, got 2"),
        (4, "not a recognised image file"),
    ]


def test_load_batch_raise(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError) as info:
        load_batch(_mixed_items(tmp_path))
    assert info.value.index == 1 and str(info.value).startswith("image 1 (")
    imgs, errs = load_batch([Image.new("RGB", (2, 2))], on_error="raise")
    assert len(imgs) == 1 and errs == [None]
    with pytest.raises(ValueError, match="on_error"):
        load_batch([], on_error="ignore")  # type: ignore[arg-type]


def test_load_batch_collect_survives_unexpected_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(images, "_from_array", broken)
    imgs, errs = load_batch([np.zeros((2, 2), np.uint8), Image.new("RGB", (2, 2))], on_error="collect")
    assert imgs[0] is None and imgs[1] is not None
    assert errs[0] is not None and errs[0].index == 0 and "RuntimeError: boom" in errs[0].reason
    with pytest.raises(RuntimeError):
        load_batch([np.zeros((2, 2), np.uint8)])


# --- preprocess ----------------------------------------------------------------------

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_preprocess_shape_dtype_range() -> None:
    batch = [noise((40, 30), 1), noise((17, 90), 2), Image.new("RGB", (8, 8), WHITE)]
    out = preprocess(batch, 32, MEAN, STD)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    assert float(out.min()) >= lo.min() - 1e-6 and float(out.max()) <= hi.max() + 1e-6
    assert torch.allclose(out[2], torch.tensor(hi, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32))
    # (height, width), like the tensor; not PIL's (width, height).
    assert preprocess(batch, (24, 40), MEAN, STD).shape == (3, 3, 24, 40)
    half = preprocess(batch, 32, MEAN, STD, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, out.to(torch.bfloat16))
    assert preprocess([], 32, MEAN, STD).shape == (0, 3, 32, 32)


def test_preprocess_is_batch_invariant() -> None:
    batch = [noise((50, 37), s) for s in range(4)]
    out = preprocess(batch, (28, 36), MEAN, STD)
    for i, im in enumerate(batch):
        assert torch.equal(preprocess([im], (28, 36), MEAN, STD)[0], out[i])
    assert torch.equal(preprocess(batch[1:3], (28, 36), MEAN, STD), out[1:3])


def test_preprocess_matches_hand_computation_on_identity_resize() -> None:
    pixels = np.array([[[0, 128, 255], [10, 20, 30]], [[255, 255, 255], [1, 2, 3]]], np.uint8)
    out = preprocess([Image.fromarray(pixels)], 2, MEAN, STD)[0]
    x = pixels.astype(np.float32) / np.float32(255)
    expected = ((x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1)
    assert np.array_equal(out.numpy(), expected)  # bit-exact, float32 throughout
    exact = ((pixels / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    assert np.allclose(out.numpy(), exact, atol=1e-6)


def test_preprocess_uses_pil_bicubic_squash() -> None:
    im = noise((61, 23), 5)
    out = preprocess([im], (16, 20), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[0]
    ref = np.asarray(im.resize((20, 16), Image.Resampling.BICUBIC, reducing_gap=None), np.float32)
    ref = ((ref / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)
    assert np.array_equal(out.numpy(), ref)


def test_preprocess_rejects_bad_arguments() -> None:
    rgb = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="load_image"):
        preprocess([Image.new("L", (4, 4))], 4, MEAN, STD)
    with pytest.raises(ValueError, match="3 values"):
        preprocess([rgb], 4, (0.5,), STD)
    with pytest.raises(ValueError, match="non-zero"):
        preprocess([rgb], 4, MEAN, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        preprocess([rgb], 0, MEAN, STD)
