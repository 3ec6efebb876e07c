"""The dynamic batcher without HTTP: a fake model records every batch it is given."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vlv_engine.serve.batcher import DynamicBatcher, QueueFull, RequestTimeout, ShuttingDown, WorkerDied


class FakeModel:
    """Upper-cases strings; 'boom' fails the whole batch it is in. With `gate`, every
    batch waits until the test opens it."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.batches: list[list[str]] = []
        self.started = threading.Event()

    def __call__(self, payloads: list[str]):
        self.batches.append(list(payloads))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if "boom" in payloads:
            raise RuntimeError("boom in batch")
        return [ValueError(f"bad {p}") if p.startswith("bad") else p.upper() for p in payloads]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(model: FakeModel) -> None:
    while not model.started.is_set():
        await asyncio.sleep(0.005)


def test_full_batches_go_at_once_without_waiting_for_the_delay():
    model = FakeModel()

    async def main():
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=30.0, max_queue=64)
        await b.start()
        t0 = time.monotonic()
        out = await b.submit_many([f"x{i}" for i in range(8)])
        took = time.monotonic() - t0
        await b.close()
        return out, took

    out, took = run(main())
    assert out == [f"X{i}" for i in range(8)]
    assert [len(x) for x in model.batches] == [4, 4]
    assert took < 10  # far below the 30 s delay: size alone released both batches


def test_concurrent_requests_share_one_batch_after_the_delay():
    model = FakeModel()

    async def main():
        b = DynamicBatcher(model, max_batch_size=100, max_delay_s=0.2, max_queue=64)
        await b.start()
        t0 = time.monotonic()
        out = await asyncio.gather(*(b.submit(p) for p in ("a", "b", "c")))
        took = time.monotonic() - t0
        await b.close()
        return out, took

    out, took = run(main())
    assert out == ["A", "B", "C"]
    assert model.batches == [["a", "b", "c"]]
    assert took >= 0.19  # the first item waited the full delay for company


def test_a_lone_request_waits_at_most_the_delay():
    model = FakeModel()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.05, max_queue=8)
        await b.start()
        t0 = time.monotonic()
        out = await b.submit("solo")
        took = time.monotonic() - t0
        await b.close()
        return out, took

    out, took = run(main())
    assert out == "SOLO" and model.batches == [["solo"]]
    assert 0.045 <= took < 2.0


def test_one_failing_item_does_not_fail_the_others():
    model = FakeModel()

    async def main():
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.0, max_queue=8)
        await b.start()
        out = await b.submit_many(["a", "boom", "c", "bad-d"])
        await b.close()
        return out

    out = run(main())
    assert out[0] == "A" and out[2] == "C"
    assert isinstance(out[1], RuntimeError) and "boom" in str(out[1])
    assert isinstance(out[3], ValueError) and str(out[3]) == "bad bad-d"  # per-item error passed through
    # The batch failed as a whole, then each item ran alone.
    assert model.batches == [["a", "boom", "c", "bad-d"], ["a"], ["boom"], ["c"], ["bad-d"]]


def test_a_wrong_number_of_results_is_isolated_too():
    batches = []

    def short(payloads):
        batches.append(payloads)
        return [p.upper() for p in payloads][:1]

    async def main():
        b = DynamicBatcher(short, max_batch_size=4, max_delay_s=0.0, max_queue=8)
        await b.start()
        out = await b.submit_many(["a", "b"])
        await b.close()
        return out

    assert run(main()) == ["A", "B"]
    assert batches == [["a", "b"], ["a"], ["b"]]


def test_timeout_withdraws_queued_items():
    gate = threading.Event()
    model = FakeModel(gate)
    depths = []

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, max_queue=8, on_queue_depth=depths.append)
        await b.start()
        first = asyncio.create_task(b.submit("first"))
        await started(model)  # "first" occupies the model thread
        with pytest.raises(RequestTimeout, match="0.1 s"):
            await b.submit("late", timeout=0.1)
        depth_after_timeout = b.queue_depth
        gate.set()
        result = await first
        await b.close()
        return depth_after_timeout, result

    depth, result = run(main())
    assert result == "FIRST"
    assert depth == 0 and depths[-1] == 0
    assert ["late"] not in model.batches  # withdrawn, never computed


def test_queue_full_is_refused_at_once_and_whole():
    gate = threading.Event()
    model = FakeModel(gate)

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, max_queue=2)
        await b.start()
        running = asyncio.create_task(b.submit("run"))
        await started(model)
        queued = asyncio.create_task(b.submit_many(["q1"]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="limit 2"):
            await b.submit_many(["q2", "q3"])  # 1 + 2 > 2: none of them queued
        depth = b.queue_depth
        fits = asyncio.create_task(b.submit("q4"))  # 1 + 1 <= 2
        await asyncio.sleep(0.01)
        gate.set()
        out = [await running, await queued, await fits]
        await b.close()
        return depth, out

    depth, out = run(main())
    assert depth == 1
    assert out == ["RUN", ["Q1"], "Q4"]
    assert all("q2" not in batch and "q3" not in batch for batch in model.batches)


def test_close_finishes_queued_and_running_work_then_refuses():
    gate = threading.Event()
    model = FakeModel(gate)

    async def main():
        b = DynamicBatcher(model, max_batch_size=2, max_delay_s=0.0, max_queue=16)
        await b.start()
        tasks = [asyncio.create_task(b.submit(f"r{i}")) for i in range(5)]
        await started(model)
        closing = asyncio.create_task(b.close())
        await asyncio.sleep(0.02)
        assert not b.accepting
        with pytest.raises(ShuttingDown):
            await b.submit("too late")
        assert not closing.done()  # still waiting for the gated batch
        gate.set()
        await closing
        return [await t for t in tasks]

    assert run(main()) == [f"R{i}" for i in range(5)]
    assert sorted(p for batch in model.batches for p in batch) == [f"r{i}" for i in range(5)]


def test_batch_metrics_callback_sees_every_batch():
    model = FakeModel()
    seen = []

    async def main():
        b = DynamicBatcher(model, max_batch_size=3, max_delay_s=0.0, max_queue=16,
                           on_batch=lambda n, s: seen.append((n, s)))
        await b.start()
        await b.submit_many(list("abcdefg"))
        await b.close()

    run(main())
    assert [n for n, _ in seen] == [3, 3, 1]
    assert all(s >= 0 for _, s in seen)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(FakeModel(), max_batch_size=0, max_delay_s=0.0, max_queue=1)


class Fatal(BaseException):
    """What no batch isolation catches (not an Exception)."""


def test_a_worker_that_dies_fails_what_waits_and_says_why():
    """An error the batch isolation does not catch stops the worker: the running batch and
    everything queued behind it fail at once (nothing waits for a timeout), later
    submissions are refused with the reason, and `failure` reports it (the service's
    health check turns 503 on it)."""
    gate = threading.Event()

    def model(payloads):
        assert gate.wait(10)
        if "fatal" in payloads:
            raise Fatal("model thread broke")
        return [p.upper() for p in payloads]

    async def main():
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, max_queue=8)
        await b.start()
        assert b.failure is None
        first = asyncio.ensure_future(b.submit_many(["fatal"]))
        await asyncio.sleep(0.05)  # "fatal" is on the model thread
        queued = asyncio.ensure_future(b.submit_many(["x"]))
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, queued, return_exceptions=True)
        with pytest.raises(WorkerDied, match="Fatal: model thread broke"):
            await b.submit_many(["later"])
        failure = b.failure
        await b.close()
        return results, failure, b.failure

    (first, queued), failure, after_close = run(main())
    assert isinstance(first, WorkerDied) and isinstance(queued, WorkerDied)
    assert "Fatal" in failure and after_close is None
