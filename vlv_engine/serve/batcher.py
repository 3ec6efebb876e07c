"""Dynamic batching: many concurrent requests -> few model calls on one worker thread.

Requests put their items on a bounded queue held by the event loop. A collector task
takes the oldest item, waits at most ``max_delay_s`` (from that item's arrival) for
up to ``max_batch_size`` items, and runs them as one batch on a single model thread,
so the event loop keeps serving while the model computes. While a batch runs the
queue fills, and the next batch is usually full at once: under load the batch size
grows by itself, idle requests pay at most ``max_delay_s``.

Guarantees:

* A failure never spreads: ``run_batch`` returns one value or exception per item; if
  it raises, each item is run alone, so only the item that fails again fails.
* Backpressure: a submission that would take the queue over ``max_queue`` items is
  refused at once with :class:`QueueFull` (the service's 503), never half-queued.
* Timeouts: a submission that is not answered within its timeout raises
  :class:`RequestTimeout`; its items still queued are withdrawn (not computed).
* Shutdown: :meth:`close` refuses new work, then runs everything already queued and
  in flight to completion before the worker stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

# run_batch(payloads) -> one result per payload: a value, or the exception for that item.
RunBatch = Callable[[list[P]], Sequence[Any]]


class BatcherError(Exception):
    """A submission the batcher could not take or finish."""


class QueueFull(BatcherError):
    pass


class ShuttingDown(BatcherError):
    pass


class RequestTimeout(BatcherError):
    pass


class WorkerDied(BatcherError):
    """The batcher's worker stopped on an error no batch isolation catches: nothing more
    will be served (the service reports itself unhealthy, to be restarted)."""


@dataclass(eq=False)
class _Item(Generic[P]):
    payload: P
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher(Generic[P, R]):
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_delay_s: float, max_queue: int,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_queue_depth: Callable[[int], None] | None = None, thread_name: str = "vlv-model"):
        if max_batch_size < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, max_delay_s >= 0; got "
                             f"{max_batch_size}, {max_queue}, {max_delay_s}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._thread_name = thread_name
        self._pending: deque[_Item[P]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._collector: asyncio.Task | None = None
        self._closing = False
        self.in_flight = 0  # items handed to the model thread, not yet answered

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._collector is not None:
            raise RuntimeError("batcher already started")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._thread_name)
        self._collector = asyncio.get_running_loop().create_task(self._collect(), name="vlv-batcher")

    async def close(self) -> None:
        """Refuse new submissions, finish everything queued or running, stop the thread."""
        self._closing = True
        if self._collector is None:
            return
        self._wakeup.set()
        try:
            # A worker that died has answered everything already (`failure` says why).
            await asyncio.gather(self._collector, return_exceptions=True)
        finally:
            self._executor.shutdown(wait=True)

    @property
    def accepting(self) -> bool:
        return self._collector is not None and not self._closing and not self._collector.done()

    @property
    def failure(self) -> str | None:
        """Why the worker stopped on its own (None while it runs, or after `close`)."""
        task = self._collector
        if task is None or not task.done() or self._closing:
            return None
        if task.cancelled():
            return "the batcher's worker was cancelled"
        exc = task.exception()
        return f"the batcher's worker died ({type(exc).__name__}: {exc})" if exc else "the batcher's worker stopped"

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def run_in_worker(self, fn: Callable[[], R]) -> R:
        """Run `fn` on the model thread (e.g. a warm-up), between batches."""
        if self._executor is None:
            raise RuntimeError("batcher not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ------------------------------------------------------------------ submitting

    async def submit_many(self, payloads: Sequence[P], *, timeout: float | None = None) -> list[Any]:
        """Queue the payloads together; returns one result (value or exception) each."""
        if not self.accepting:
            if self.failure is not None:
                raise WorkerDied(self.failure)
            raise ShuttingDown("the service is shutting down" if self._closing else "batcher not started")
        if len(self._pending) + len(payloads) > self.max_queue:
            raise QueueFull(f"queue full ({len(self._pending)} images waiting, limit {self.max_queue}); "
                            f"retry later")
        loop = asyncio.get_running_loop()
        items = [_Item(p, loop.create_future()) for p in payloads]
        self._pending.extend(items)
        self._depth_changed()
        self._wakeup.set()
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), timeout))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no answer within {timeout:g} s") from None
        finally:
            # Timed out or cancelled: withdraw what the model has not started.
            self._withdraw(items)

    async def submit(self, payload: P, *, timeout: float | None = None) -> R:
        (result,) = await self.submit_many([payload], timeout=timeout)
        if isinstance(result, BaseException):
            raise result
        return result

    def _withdraw(self, items: list[_Item[P]]) -> None:
        removed = False
        for item in items:
            if item.future.done() and not item.future.cancelled():
                continue
            item.future.cancel()  # (wait_for may have cancelled it already)
            try:
                self._pending.remove(item)
                removed = True
            except ValueError:
                pass  # already on the model thread; its result will be dropped
        if removed:
            self._depth_changed()

    def _depth_changed(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._pending))

    # ------------------------------------------------------------------ worker

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company, up to max_delay_s after the oldest item arrived.
            while len(self._pending) < self.max_batch_size and not self._closing:
                remaining = self._pending[0].enqueued + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                if not self._pending:  # everything waiting was withdrawn
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            if not batch:
                continue
            self._depth_changed()
            self.in_flight = len(batch)
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._run_isolated,
                                                     [i.payload for i in batch])
            except BaseException as exc:
                # The collector is cancelled, or the model thread raised what `_run_isolated`
                # does not catch (not an Exception): nothing more runs, so nothing may wait.
                if not isinstance(exc, asyncio.CancelledError):
                    log.error("the batcher's worker died", exc_info=exc)
                stopped = ShuttingDown if isinstance(exc, asyncio.CancelledError) else WorkerDied
                for item in [*batch, *self._pending]:
                    if not item.future.done():
                        item.future.set_exception(stopped(f"worker stopped ({type(exc).__name__}: {exc})"))
                self._pending.clear()
                self._depth_changed()
                raise
            finally:
                self.in_flight = 0
            if self._on_batch is not None:
                self._on_batch(len(batch), time.monotonic() - started)
            for item, result in zip(batch, results):
                if not item.future.done():  # a timed-out request no longer waits
                    item.future.set_result(result)

    def _run_isolated(self, payloads: list[P]) -> list[Any]:
        """On the model thread: the batch, or each item alone if the batch fails."""
        try:
            results = list(self._run_batch(payloads))
            if len(results) != len(payloads):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(payloads)} items")
            return results
        except Exception as exc:
            if len(payloads) == 1:
                return [exc]
            log.warning("batch of %d failed (%s: %s); running its items one by one", len(payloads),
                        type(exc).__name__, exc)
        out: list[Any] = []
        for payload in payloads:
            try:
                (result,) = self._run_batch([payload])
            except Exception as exc:
                result = exc
            out.append(result)
        return out
