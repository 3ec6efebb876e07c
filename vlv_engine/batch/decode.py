"""Image decoding in worker processes, overlapped with the model in the main process.

A task is one batch: the workers read each item's bytes, hash them (the manifest's
content key), decode them with ``vlv_engine.images`` (the project's one image path:
limits checked on the header, EXIF, modes) and resize them to the encoder's input
size, returning ``uint8 [S, S, 3]`` arrays: a 24-megapixel photo crosses the process
boundary as 1.7 MB, not 72 MB.  The resize is exactly the one ``images.preprocess``
makes (bicubic, ``reducing_gap=None``; the native extension's when it is built, which
reproduces Pillow's bit for bit), and Pillow resizing an image to its own size
is a copy, so the main process's ``preprocess`` of these arrays is bit-identical to
preprocessing the original image.

Memory is bounded: at most ``max_in_flight`` batches are decoded or waiting.  The
pool uses ``spawn`` (no fork of a process that holds a model and threads), and this
module does not import torch, so workers start in a fraction of a second.

A decoder that crashes its process (a segfault on a hostile file) breaks the pool;
the pool is restarted and that batch's items are decoded one per task, so only the
item that kills a worker again is failed, with a reason saying so.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlv_engine import images as image_io
from vlv_engine import native as native_ops
from vlv_engine.batch.inputs import Source, read_bytes

__all__ = ["DecodePool", "DecodeTask", "Decoded", "decode_batch"]

log = logging.getLogger(__name__)

WORKER_CRASHED = "the image decoder crashed its worker process"


@dataclass(frozen=True, slots=True)
class DecodeTask:
    source: Source
    decode: bool = True  # False: read and hash only (the caption embedding is cached)


@dataclass(frozen=True, slots=True)
class Decoded:
    sha256: str | None  # None: the bytes could not be read
    pixels: np.ndarray | None = None  # uint8 [S, S, 3]
    reason: str | None = None  # why the item failed


def decode_one(task: DecodeTask, size: int, max_pixels: int | None) -> Decoded:
    try:
        data = read_bytes(task.source)
    except FileNotFoundError:
        return Decoded(None, reason="file not found")
    except IsADirectoryError:
        return Decoded(None, reason="is a directory, not a file")
    except PermissionError:
        return Decoded(None, reason="permission denied")
    except Exception as exc:
        return Decoded(None, reason=f"cannot read ({type(exc).__name__}: {exc})")
    sha = hashlib.sha256(data).hexdigest()
    if not task.decode:
        return Decoded(sha)
    try:
        image = image_io.load_image(data, max_pixels=max_pixels)
        if native_ops.available():  # the same pixels, bit for bit (tests/native), a few times faster
            return Decoded(sha, pixels=native_ops.resize_batch([np.asarray(image)], size, num_threads=1)[0])
        resized = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
        return Decoded(sha, pixels=np.asarray(resized, dtype=np.uint8))
    except image_io.ImageInputError as err:
        return Decoded(sha, reason=err.reason)
    except Exception as exc:  # a decoder bug must cost one item, not the run
        log.warning("unexpected error decoding an image", exc_info=True)
        return Decoded(sha, reason=f"unexpected error ({type(exc).__name__}: {exc})")


def decode_batch(tasks: list[DecodeTask], size: int, max_pixels: int | None) -> list[Decoded]:
    return [decode_one(t, size, max_pixels) for t in tasks]


def _ready() -> None:
    """A no-op task: submitting one makes the pool spawn a worker now."""


class DecodePool:
    """Ordered, bounded map of ``decode_batch`` over batches; ``workers=0`` decodes
    in the calling process (no overlap, for debugging and tiny jobs)."""

    def __init__(self, workers: int, *, size: int | None = None, max_pixels: int | None = None,
                 max_in_flight: int | None = None, batch_fn: Callable[..., list[Decoded]] = decode_batch) -> None:
        # size (the encoder's input size) may be set after construction, before ``map``:
        # a pool started before the model is loaded does not know it yet.
        self.workers = workers
        self.batch_fn = batch_fn  # a module-level function (workers import it by name)
        self.size = size
        self.max_pixels = max_pixels
        self.max_in_flight = max_in_flight or max(2, 2 * workers)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "DecodePool":
        """Spawn the workers now rather than on the first batch: a spawned worker takes
        a fraction of a second to start (more on a busy machine), which the first batch
        would otherwise wait for.  Start the pool before slow work (loading the model,
        hashing its weights, planning) so the two overlap."""
        if self.workers > 0 and self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.workers):  # the executor spawns a worker per waiting task
                self._pool.submit(_ready)
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, batches: Iterable[list[DecodeTask]]) -> Iterator[list[Decoded]]:
        if self.size is None:
            raise ValueError("DecodePool.size (the encoder's input size) must be set before map")
        if self.workers <= 0:
            for tasks in batches:
                yield self.batch_fn(tasks, self.size, self.max_pixels)
            return
        pending: deque[tuple[list[DecodeTask], Future]] = deque()
        source = iter(batches)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.max_in_flight:
                tasks = next(source, None)
                if tasks is None:
                    exhausted = True
                else:
                    pending.append((tasks, self._submit(tasks)))
            if not pending:
                break
            tasks, future = pending.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                yield self._isolate(tasks)
                # Every other in-flight batch died with the pool: send them again.
                pending = deque((t, self._submit(t)) for t, _ in pending)

    def _submit(self, tasks: list[DecodeTask]) -> Future:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool.submit(self.batch_fn, tasks, self.size, self.max_pixels)

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _isolate(self, tasks: list[DecodeTask]) -> list[Decoded]:
        log.warning("a decode worker died; decoding its batch of %d one item at a time", len(tasks))
        self._restart()
        try:
            self._submit([]).result()
        except BrokenProcessPool:
            # Workers that die with no image at all are not the images' fault: stop
            # rather than mark every item failed.
            raise RuntimeError("decode worker processes cannot start (run with workers=0 to decode in this "
                               "process and see why)") from None
        out = []
        for task in tasks:
            try:
                out.extend(self._submit([task]).result())
            except BrokenProcessPool:
                self._restart()
                out.append(Decoded(None, reason=WORKER_CRASHED))
        return out
