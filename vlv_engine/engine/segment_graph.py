"""Replay a fixed-shape segment per batch bucket: CUDA graphs, and their CPU twin.

The phi -> text encoder segment has fixed shapes ([b, Nq, d] -> [b, Nq, D]), so on CUDA
it is captured once per batch bucket and replayed from static buffers: a batch of n
goes into the smallest bucket b >= n (rows n..b zeroed: rows never mix, so the padding
changes nothing in rows 0..n), the graph replays, rows 0..n are copied out.

    runner = BucketedSegment(segment, buckets=(1, 2, 4, 8), recorder=cuda_graph_recorder)
    out = runner(x)  # [n, Nq, d] -> [n, Nq, D], any n (above the largest bucket: in chunks)

A recorder turns (segment, static input) into a `Recording` (``replay()`` writes
``static_output``). `CUDAGraphRecorder` captures a CUDA graph after a warm-up on a
side stream, every bucket's graph in one shared memory pool; `eager_recorder` reruns the segment on the same static buffers, so the
bookkeeping (buckets, padding, slicing back, buffer reuse) is tested on a CPU.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from vlv_engine.engine.cuda_graph import CapturedStep, graph_pool

Segment = Callable[[Tensor], Tensor]


class Recording(Protocol):
    static_output: Tensor

    def replay(self) -> None: ...


def power_of_two_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to and including max_batch (which need not be a power of two)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n rows (n <= max(buckets))."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {max(buckets)}")


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """x [n, ...] -> [rows, ...] with zero rows appended (x itself when n == rows)."""
    n = x.shape[0]
    if n == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - n, *x.shape[1:]))])


class EagerRecording:
    """The CPU twin of a CUDA graph: replay() runs the segment on the static input and
    writes the static output in place, as a graph replay does."""

    def __init__(self, segment: Segment, static_input: Tensor):
        self.segment, self.static_input = segment, static_input
        with torch.no_grad():
            self.static_output = segment(static_input).clone()

    def replay(self) -> None:
        with torch.no_grad():
            self.static_output.copy_(self.segment(self.static_input))


def eager_recorder(segment: Segment, static_input: Tensor) -> EagerRecording:
    return EagerRecording(segment, static_input)


class CUDAGraphRecording:
    """One CUDA graph of `segment` on `static_input` (a CUDA tensor); `pool`: a memory pool
    shared with other recordings (`CUDAGraphRecorder`)."""

    def __init__(self, segment: Segment, static_input: Tensor, warmup: int = 2, pool=None):
        def run() -> Tensor:
            with torch.no_grad():
                return segment(static_input)

        self._step = CapturedStep(run, warmup=warmup, device=static_input.device, pool=pool)
        self.static_output = self._step.result
        self.static_input = static_input

    def replay(self) -> None:
        self._step()


class CUDAGraphRecorder:
    """Records CUDA graphs that share one memory pool, so a runner's buckets hold one set of
    intermediates (the largest bucket's) rather than one per bucket. Safe because a
    replay's output is copied out before the next replay (`BucketedSegment`) and
    recordings never run at once."""

    def __init__(self):
        self.pool = None

    def __call__(self, segment: Segment, static_input: Tensor) -> CUDAGraphRecording:
        if static_input.device.type != "cuda":
            raise ValueError(f"CUDA graphs capture CUDA work; the static input is on {static_input.device}")
        if self.pool is None:
            self.pool = graph_pool()
        return CUDAGraphRecording(segment, static_input, pool=self.pool)


def cuda_graph_recorder(segment: Segment, static_input: Tensor) -> CUDAGraphRecording:
    """One recording with its own memory pool."""
    if static_input.device.type != "cuda":
        raise ValueError(f"CUDA graphs capture CUDA work; the static input is on {static_input.device}")
    return CUDAGraphRecording(segment, static_input)


class BucketedSegment:
    """`segment` replayed from one recording per batch bucket, recorded on first use."""

    def __init__(self, segment: Segment, buckets: Sequence[int],
                 recorder: Callable[[Segment, Tensor], Recording] = eager_recorder):
        if not buckets or sorted(set(buckets)) != list(buckets) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive batch sizes, got {tuple(buckets)}")
        self.segment, self.buckets, self.recorder = segment, tuple(buckets), recorder
        self.recordings: dict[int, Recording] = {}
        self._inputs: dict[int, Tensor] = {}

    def __call__(self, x: Tensor) -> Tensor:
        largest = self.buckets[-1]
        if x.shape[0] > largest:
            return torch.cat([self(x[i:i + largest]) for i in range(0, x.shape[0], largest)])
        n = x.shape[0]
        b = bucket_for(n, self.buckets)
        static = self._inputs.get(b)
        if static is not None and (static.shape[1:] != x.shape[1:] or static.dtype != x.dtype
                                   or static.device != x.device):
            raise ValueError(f"segment recorded for inputs {tuple(static.shape[1:])} {static.dtype} on "
                             f"{static.device}, got {tuple(x.shape[1:])} {x.dtype} on {x.device}")
        if static is None:
            static = self._inputs[b] = pad_rows(x, b).clone()  # [b, ...]
            self.recordings[b] = self.recorder(self.segment, static)  # a capture computes nothing
        else:
            static[:n].copy_(x)
            static[n:].zero_()
        self.recordings[b].replay()
        return self.recordings[b].static_output[:n].clone()
