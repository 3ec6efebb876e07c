"""One decode token as one CUDA graph replay (`CapturedStep`, also behind the encoder's
segment graphs in `segment_graph`).

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
syncs, and nothing allocated in the call that is read after it. Warm-up calls change
those buffers: the decoder resets them after capturing. `tests/decode/
test_capture_emulated.py` checks these properties on the CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


class CaptureError(RuntimeError):
    """CUDA refused to capture a step that ran without error in its warm-up calls (an
    operation forbidden while capturing, in a library's kernels say). The step itself
    works: a caller may run it uncaptured."""


class CapturedStep:
    """`fn()` captured into a CUDA graph; calling it replays the graph.

    pool: a memory pool shared by a decoder's graphs (`torch.cuda.graph_pool_handle()`).
    Sharing is safe here because the steps keep nothing in the pool between replays (their
    results are written into the caller's buffers) and one decoder never replays two
    graphs at once. `result`: what `fn` returned while being captured (tensors it
    allocated live in the graph's memory, and each replay rewrites them).

    An error in a warm-up call is the step's own and propagates as it is; a failed
    capture raises `CaptureError`."""

    def __init__(self, fn: Callable[[], object], *, pool=None, warmup: int = 2, device: torch.device | None = None):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graph capture needs a CUDA device; this torch sees none")
        # Warm up on a side stream, as capture requires: it compiles the step, runs
        # autotuning and initializes the libraries (cuBLAS workspaces) outside the capture,
        # and lets the caching allocator settle (a capture may not compile or allocate anew).
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph's exit ends the capture before it leaves its capture stream, so a
        # capture that fails would leave this thread on that stream for whatever runs next.
        before = torch.cuda.current_stream(device)
        try:
            # thread_local: a service's other threads may use the GPU (preprocessing, another
            # engine) while this one captures; "global" would make their calls fail the capture.
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.result = fn()
        except RuntimeError as err:
            raise CaptureError(str(err)) from err
        finally:
            torch.cuda.set_stream(before)

    def __call__(self) -> None:
        self.graph.replay()


def graph_pool():
    """A new memory pool for a decoder's graphs to share."""
    return torch.cuda.graph_pool_handle()


def mark_static_buffers(state) -> None:
    """Tag every tensor of a search state (a dataclass) as a buffer whose address never
    changes, as transformers tags its static cache. Inductor's own CUDA graphs
    (`StaticDecoder(cuda_graphs=False)`) skip a graph whose inputs it writes unless they are
    so tagged; without guards (`guard=False`), so no recompile is tied to an address."""
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if isinstance(value, torch.Tensor):
            torch._dynamo.mark_static_address(value)
