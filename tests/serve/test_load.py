"""A bounded load test on loopback: a real uvicorn server, 8 concurrent clients for
about 3 s (at most 600 requests); no errors, right captions, batches formed."""

from __future__ import annotations

import asyncio
import time

import httpx
from serve_helpers import files, live_server, noise_png, wait_ready

from vlv_engine.serve import ServeConfig

CLIENTS, SECONDS, MAX_REQUESTS = 8, 3.0, 600


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_loopback_load_no_errors_and_batches_form(engine):
    images = [noise_png(i, (32 + i, 32)) for i in range(4)]
    want = engine.caption(images)  # before the server owns the engine's thread
    config = ServeConfig(max_batch_size=8, max_delay_ms=5, max_queue=64)
    with live_server(engine, config) as (server, base, _):
        wait_ready(lambda path: httpx.get(base + path))
        latencies, failures = [], []

        async def client(k: int, stop: float, budget: list[int]) -> None:
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                i = k
                while time.monotonic() < stop and budget[0] > 0:
                    budget[0] -= 1
                    t0 = time.perf_counter()
                    r = await http.post("/v1/caption", files=files((f"{i}.png", images[i % 4])))
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code != 200 or r.json()["results"][0].get("caption") != want[i % 4]:
                        failures.append((r.status_code, r.text[:200]))
                    i += 1

        async def main():
            stop = time.monotonic() + SECONDS
            budget = [MAX_REQUESTS]
            await asyncio.gather(*(client(k, stop, budget) for k in range(CLIENTS)))

        t0 = time.perf_counter()
        asyncio.run(main())
        wall = time.perf_counter() - t0
        metrics = httpx.get(base + "/metrics").text
    assert failures == []
    assert len(latencies) >= CLIENTS  # every client got answers
    assert wall < SECONDS + 30
    batches = _metric_sum(metrics, "vlv_batch_size_count")
    images_in_batches = _metric_sum(metrics, "vlv_batch_size_sum")
    assert images_in_batches == len(latencies)
    assert images_in_batches / batches > 1.5  # concurrent requests were batched together
    lat = sorted(latencies)
    print(f"{len(lat)} requests in {wall:.1f} s, p50 {lat[len(lat) // 2] * 1e3:.0f} ms, "
          f"p99 {lat[int(len(lat) * 0.99) - 1] * 1e3:.0f} ms, mean batch {images_in_batches / batches:.1f}")
