"""One decode token as one CUDA graph replay.

A compiled token step (decode step + cache reordering + search bookkeeping, all in place
on fixed buffers) still costs the host dynamo's guard checks on every call: hundreds of
tensors (every weight, every cache buffer), ~2 ms per call measured on our CPU for a
36-layer model. Inductor's own CUDA graphs ("reduce-overhead") replay behind those same
guards. A quantized 3B model's step reads its weights in well under a millisecond on an
H100, so the host, not the GPU, would set the pace.

So on CUDA the step is captured once per (cache, search) into a `torch.cuda.CUDAGraph`
after warm-up calls (which compile it), and each token is `graph.replay()`: no Python
model code, no guards, one launch (the approach of vLLM's decode graphs). What this needs
of the step, and what our token steps guarantee: fixed shapes, inputs and outputs in
buffers whose addresses never change (the KV cache and the search state), no host
syncs and no allocation that outlives the call. Warm-up calls change those buffers:
the caller resets them after `capture`.
"""

from __future__ import annotations

from typing import Callable

import torch


class CapturedStep:
    """`fn()` captured into a CUDA graph; calling it replays the graph.

    pool: a memory pool shared by a decoder's graphs (`torch.cuda.graph_pool_handle()`).
    Sharing is safe here because the steps keep nothing in the pool between replays (their
    results are written into the caller's buffers) and one decoder never replays two
    graphs at once."""

    def __init__(self, fn: Callable[[], None], *, pool=None, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graph capture needs a CUDA device; this torch sees none")
        # Warm up on a side stream, as capture requires: it compiles the step, runs
        # autotuning and initializes the libraries (cuBLAS workspaces) outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()

    def __call__(self) -> None:
        self.graph.replay()


def graph_pool():
    """A new memory pool for a decoder's graphs to share."""
    return torch.cuda.graph_pool_handle()
