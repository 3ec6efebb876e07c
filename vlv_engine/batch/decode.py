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

Each worker is a process with a pipe of its own (``_Worker`` says why not a
``ProcessPoolExecutor``).  A decoder that crashes its process (a segfault on a
hostile file) is seen as the pipe closing; the worker is replaced and that batch's
items are decoded one per task, so only the item that kills a worker again is
failed, with a reason saying so.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlv_engine import images as image_io
from vlv_engine import native as native_ops
from vlv_engine.batch.inputs import Source, UnreadableInput, read_bytes

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
    except UnreadableInput as exc:
        return Decoded(None, reason=str(exc))
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


class _Worker:
    """One decode process and the pipe to it.

    Why not ``concurrent.futures.ProcessPoolExecutor``: its submissions and results
    pass through helper threads in the main process, and each hand-off waits for the
    GIL, which the model's Python code holds; measured here with a busy main thread,
    31 batches waited 0.26-0.30 s in total for results the workers had finished,
    against 0.01 s over a direct pipe, which the main thread writes and reads itself.
    """

    def __init__(self, batch_fn: Callable[..., list[Decoded]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, batch_fn), daemon=True, name="vlv-decode")
        self.proc.start()
        child.close()
        self.in_flight = 0

    def send(self, tasks: list[DecodeTask], size: int | None, max_pixels: int | None) -> None:
        try:
            self.conn.send((tasks, size, max_pixels))
        except (BrokenPipeError, ConnectionResetError):
            # It died and we have not read that yet: the batch counts as sent, and
            # ``recv`` reports the death when this batch's turn comes, after any
            # results it sent before dying.
            pass
        self.in_flight += 1

    def recv(self) -> list[Decoded]:
        """The oldest batch's result; raises ``_WorkerDied`` when the process is gone."""
        try:
            result = self.conn.recv()
        except (EOFError, OSError):
            raise _WorkerDied from None
        self.in_flight -= 1
        return result

    def stop(self) -> None:
        # Closing the pipe ends an idle worker (EOF) and a busy one at its next send.
        self.conn.close()
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class _WorkerDied(Exception):
    pass


def _serve(conn, batch_fn: Callable[..., list[Decoded]]) -> None:
    """A worker's loop: (tasks, size, max_pixels) in, decoded batch out, until EOF."""
    try:
        while True:
            try:
                tasks, size, max_pixels = conn.recv()
            except EOFError:
                return
            conn.send(batch_fn(tasks, size, max_pixels))
    except (BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the pool closed (or Ctrl-C reached the whole process group)


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
        self._procs: list[_Worker] = []

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "DecodePool":
        """Spawn the workers now rather than on the first batch: a spawned worker takes
        a fraction of a second to start (more on a busy machine), which the first batch
        would otherwise wait for.  Start the pool before slow work (loading the model,
        hashing its weights, planning) so the two overlap."""
        while len(self._procs) < self.workers:
            self._procs.append(_Worker(self.batch_fn))
        return self

    def close(self) -> None:
        procs, self._procs = self._procs, []
        for worker in procs:
            worker.stop()

    def map(self, batches: Iterable[list[DecodeTask]]) -> Iterator[list[Decoded]]:
        if self.size is None:
            raise ValueError("DecodePool.size (the encoder's input size) must be set before map")
        if self.workers <= 0:
            for tasks in batches:
                yield self.batch_fn(tasks, self.size, self.max_pixels)
            return
        self.start()
        # A worker answers its batches in the order it got them, so each pending batch
        # only needs to know its worker.
        pending: deque[tuple[list[DecodeTask], _Worker]] = deque()
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
            tasks, worker = pending.popleft()
            try:
                result = worker.recv()
            except _WorkerDied:
                fresh = self._replace(worker)
                # The dead worker's other batches died with it: send them again, in
                # order, to its replacement (a worker answers in the order it was sent).
                pending = deque((t, self._send(fresh, t)) if w is worker else (t, w) for t, w in pending)
                result = self._isolate(tasks)
            yield result

    def _submit(self, tasks: list[DecodeTask]) -> _Worker:
        return self._send(min(self._procs, key=lambda w: w.in_flight), tasks)

    def _send(self, worker: _Worker, tasks: list[DecodeTask]) -> _Worker:
        worker.send(tasks, self.size, self.max_pixels)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        worker.stop()
        fresh = _Worker(self.batch_fn)
        self._procs[self._procs.index(worker)] = fresh
        return fresh

    def _isolate(self, tasks: list[DecodeTask]) -> list[Decoded]:
        log.warning("a decode worker died; decoding its batch of %d one item at a time", len(tasks))
        # A worker of its own, so batches still in flight on the others are untouched.
        worker = _Worker(self.batch_fn)
        try:
            worker.send([], self.size, self.max_pixels)
            worker.recv()
        except _WorkerDied:
            worker.stop()
            # Workers that die with no image at all are not the images' fault: stop
            # rather than mark every item failed.
            raise RuntimeError("decode worker processes cannot start (run with workers=0 to decode in this "
                               "process and see why)") from None
        out = []
        try:
            for task in tasks:
                try:
                    worker.send([task], self.size, self.max_pixels)
                    out.extend(worker.recv())
                except _WorkerDied:
                    worker.stop()
                    worker = _Worker(self.batch_fn)
                    out.append(Decoded(None, reason=WORKER_CRASHED))
        finally:
            worker.stop()
        return out
