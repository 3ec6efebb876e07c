"""Images (good and hostile), a slowed-down engine and client helpers for tests/serve."""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import time
import zlib

import numpy as np
from PIL import Image


def png(color=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(seed: int, size=(48, 36)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels (10 G by default) with almost no
    data: only a check made on the header can refuse it cheaply."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def truncated_png() -> bytes:
    data = noise_png(7, (64, 64))
    return data[: len(data) // 2]


def corrupt_png() -> bytes:
    """A valid header, then the pixel data overwritten with junk."""
    data = bytearray(noise_png(8, (64, 64)))
    start = data.index(b"IDAT") + 8
    data[start:start + 200] = bytes(range(200))
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png16() -> bytes:
    arr = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # uint16 -> I;16
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 200, 200, 10)).save(buf, "JPEG")
    return buf.getvalue()


def rgba_png() -> bytes:
    arr = np.zeros((30, 40, 4), dtype=np.uint8)
    arr[..., 1] = 200
    arr[:, :20, 3] = 255  # left half opaque green, right half transparent
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGBA").save(buf, "PNG")
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


# name -> (bytes, expected per-item status, expected reason); None: captioned.
HOSTILE = {
    "zero.png": (b"", 400, "empty_image"),
    "text.png": (b"this is a text file, not an image\n", 415, "not_an_image"),
    "truncated.png": (truncated_png(), 400, "corrupt_image"),
    "corrupt.png": (corrupt_png(), 400, "corrupt_image"),
    "bomb.png": (bomb_png(), 413, "too_many_pixels"),  # over Pillow's own bomb limit
    "big.png": (bomb_png(9000), 413, "too_many_pixels"),  # 81 M pixels: over our 64 Mi limit only
}
ODD_BUT_VALID = {
    "animated.gif": animated_gif(),
    "sixteen.png": png16(),
    "cmyk.jpg": cmyk_jpeg(),
    "rgba.png": rgba_png(),
    "exif.jpg": exif_rotated_jpeg(),
}


class SlowEngine:
    """The real engine, with `delay` seconds added to each caption batch and a record of
    batch sizes: makes queues, timeouts and in-flight requests observable."""

    def __init__(self, engine, delay: float = 0.0):
        self._engine = engine
        self.delay = delay
        self.batch_sizes: list[int] = []
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def caption_embeddings(self, embeddings, **kwargs):
        self.batch_sizes.append(embeddings.shape[0])
        self.entered.set()
        if self.delay:
            time.sleep(self.delay)
        return self._engine.caption_embeddings(embeddings, **kwargs)


def wait_ready(get, timeout: float = 30.0) -> None:
    """Poll GET /readyz (get(path) -> response) until 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get("/readyz").status_code == 200:
                return
        except Exception:  # the server is not listening yet
            pass
        time.sleep(0.02)
    raise AssertionError(f"service not ready within {timeout} s")


def files(*named: tuple[str, bytes]) -> list:
    return [("images", (name, data, "application/octet-stream")) for name, data in named]


@contextlib.contextmanager
def live_server(engine, config):
    """A real uvicorn server on a free loopback port, in a thread of this process.
    Yields (server, base_url); leaving asks it to shut down as SIGTERM would."""
    from vlv_engine.serve.server import bind_socket, build_server

    sock = bind_socket("127.0.0.1", 0)
    server = build_server(config, engine=engine, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield server, base, thread
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
