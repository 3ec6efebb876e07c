"""Timers and peak-memory probes of the benchmark suites."""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlv_engine.bench.machine import sync


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile, q in [0, 100]."""
        s = sorted(self.seconds)
        return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
               device: torch.device = torch.device("cpu")) -> Timing:
    """Wall time of `repeats` calls of fn after `warmup` calls (compiles, caches, allocations)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = Timing()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.seconds.append(time.perf_counter() - t)
    return out


def current_rss() -> int:
    """Resident set size of this process, bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory over a block: RSS sampled every `interval` s on a thread (CPU), and
    `torch.cuda.max_memory_allocated` and `max_memory_reserved` (CUDA)."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_rss = 0
        self.peak_cuda = 0
        self.peak_cuda_reserved = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, current_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak_rss = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, current_rss())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_cuda = torch.cuda.max_memory_allocated(self.device)
            self.peak_cuda_reserved = torch.cuda.max_memory_reserved(self.device)
