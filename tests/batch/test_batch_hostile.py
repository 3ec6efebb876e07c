"""Hostile inputs: every good image captioned, every bad one reported, nothing crashes."""

import io
import os
import struct
import zlib

import numpy as np
from batch_helpers import GEN, captions_by_id, crash_on_marker, make_images, read_jsonl
from PIL import Image

from vlv_engine.batch import JobOptions, caption_dataset
from vlv_engine.batch.decode import WORKER_CRASHED, DecodePool, DecodeTask, decode_one
from vlv_engine.batch.inputs import FileSource


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (valid CRC) over a tiny payload."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    im = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (16, 1, 3)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return _jpeg_bytes(im, exif=exif.tobytes())


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def hostile_corpus(folder) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(good, bad): file name -> bytes; the good ones are odd but valid images."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (18, 18, 4), dtype=np.uint8), "RGBA")
    png = _png_bytes(rgb)
    jpeg = _jpeg_bytes(rgb)
    palette_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 0
    good = {
        "animated.gif": _animated("GIF"),
        "animated.png": _animated("PNG"),
        "palette.png": _png_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)),
        "palette_transparent.png": _png_bytes(palette_t),
        "gray16.png": _png_bytes(Image.fromarray(rng.integers(0, 65535, (14, 22), dtype=np.uint16))),
        "cmyk.jpg": _jpeg_bytes(rgb.convert("CMYK")),
        "rgba.png": _png_bytes(rgba),
        "la.png": _png_bytes(rgba.convert("LA")),
        "exif_rotated.jpg": _exif_rotated_jpeg(),
        "one_bit.png": _png_bytes(rgb.convert("1")),
        "one_pixel.png": _png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))),
        "wide.png": _png_bytes(Image.new("RGB", (2000, 1), (200, 10, 10))),
        "float.tif": _tiff_float(rng),
        "plain.webp": _webp(rgb),
        "plain.bmp": _bmp(rgb),
    }
    bad = {
        "zero.png": b"",
        "text.jpg": b"hello, I am not an image\n",
        "html.png": b"<!doctype html><html><body>404</body></html>",
        "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "random.png": b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "header_only.gif": _animated("GIF")[:20],
        "bomb_header.png": _png_claiming(200_000, 200_000),  # refused from the header
        "over_limit.png": _png_bytes(Image.new("L", (1200, 1000))),  # 1.2 M pixels > max_pixels below
        "eps.eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "garbage_jpeg.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 50,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    return good, bad


def _tiff_float(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.random((10, 12), dtype=np.float32) * 255, "F").save(buf, format="TIFF")
    return buf.getvalue()


def _webp(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="WEBP")
    return buf.getvalue()


def _bmp(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="BMP")
    return buf.getvalue()


def test_hostile_corpus_captions_the_good_and_reports_the_bad(tmp_path, engine):
    good, bad = hostile_corpus(tmp_path / "corpus")
    make_images(tmp_path / "corpus", 6, prefix="normal")
    missing = tmp_path / "missing.png"  # named explicitly, absent
    assert len(good) + len(bad) >= 20
    out = tmp_path / "out.jsonl"
    summary = caption_dataset(engine, [str(tmp_path / "corpus"), str(missing)],
                              JobOptions(out=out, generation=GEN, workers=2, batch_size=4, max_pixels=1_000_000))
    captions = captions_by_id(out)
    errors = {os.path.basename(r["id"]): r for r in read_jsonl(summary.paths.errors)}
    assert set(errors) == set(bad) | {"missing.png"}
    assert all(r["reason"] and r["path"] for r in errors.values())
    assert "pixel limit" in errors["bomb_header.png"]["reason"]
    assert "pixel limit" in errors["over_limit.png"]["reason"]
    assert errors["missing.png"]["reason"] == "file not found" and errors["missing.png"]["sha256"] is None
    assert summary.failed == len(bad) + 1 and summary.exit_status == 1
    # Every good image captioned, exactly as the engine captions the file itself.
    good_paths = sorted(p for p in (tmp_path / "corpus").iterdir() if p.name in good or p.name.startswith("normal"))
    assert sorted(captions) == [str(p) for p in good_paths]
    assert [captions[str(p)] for p in good_paths] == engine.caption(good_paths, **GEN)


def test_a_decoder_that_kills_its_worker_costs_only_that_image(tmp_path):
    paths = make_images(tmp_path, 5)
    crash = tmp_path / "CRASH.png"
    crash.write_bytes(paths[0].read_bytes())
    batches = [[DecodeTask(FileSource(str(p))) for p in (paths[0], crash, paths[1])],
               [DecodeTask(FileSource(str(p))) for p in paths[2:]]]
    with DecodePool(2, size=8, max_pixels=None, batch_fn=crash_on_marker) as pool:
        first, second = pool.map(batches)
    assert [d.reason for d in first] == [None, WORKER_CRASHED, None]
    assert all(d.pixels is not None and d.pixels.shape == (8, 8, 3) for d in (first[0], first[2], *second))


def test_file_names_that_are_not_utf8(tmp_path, engine):
    folder = tmp_path / "names"
    (good,) = make_images(folder, 1)
    odd = folder / os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8
    good.rename(odd)
    (folder / os.fsdecode(b"broken-\xfe.png")).write_bytes(b"nope")
    out = tmp_path / "out.jsonl"
    for _ in range(2):  # the rerun finds both in the manifest
        summary = caption_dataset(engine, [str(folder)], JobOptions(out=out, generation=GEN, workers=0))
    assert (summary.already_done, summary.failed) == (1, 1)
    assert captions_by_id(out) == {str(odd): engine.caption([odd], **GEN)[0]}
    assert read_jsonl(summary.paths.errors)[0]["id"] == str(folder / os.fsdecode(b"broken-\xfe.png"))


def test_batches_in_flight_on_a_crashed_worker_come_back_in_order(tmp_path):
    # One worker, several batches queued behind the one that kills it: they are sent
    # again to its replacement and every batch comes back in input order.
    paths = make_images(tmp_path, 9)
    crash = tmp_path / "CRASH.png"
    crash.write_bytes(paths[0].read_bytes())
    batches = [[DecodeTask(FileSource(str(p)))] for p in (paths[0], crash, *paths[1:])]
    with DecodePool(1, size=8, max_pixels=None, max_in_flight=4, batch_fn=crash_on_marker) as pool:
        results = list(pool.map(batches))
    assert [r[0].reason for r in results] == [None, WORKER_CRASHED] + [None] * 8
    expected = [decode_one(DecodeTask(FileSource(str(p))), 8, None).sha256 for p in (paths[0], *paths[1:])]
    assert [r[0].sha256 for i, r in enumerate(results) if i != 1] == expected
