"""Batch-size search: run a batch, and on out-of-memory split it in half and retry.

The engine is batch-invariant (an image's embedding and caption do not depend on its
batch), so the halves give exactly the captions the whole batch would have.  The
size that worked is remembered, so one OOM does not cost a failed attempt on every
later batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["AdaptiveBatch", "is_out_of_memory"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA, MPS) subclasses RuntimeError; CPU allocation
    # failures are plain RuntimeErrors, known only by their message.
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in _OOM_MESSAGES))


class AdaptiveBatch:
    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.size = batch_size

    def run(self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` in chunks of at most ``self.size``, halving on OOM;
        results in order.  An OOM on a single item is raised."""
        out: list[R] = []
        start = 0
        while start < len(items):
            chunk = items[start:start + self.size]
            try:
                out.extend(fn(chunk))
            except Exception as exc:
                if not is_out_of_memory(exc) or len(chunk) == 1:
                    raise
                self.size = max(1, len(chunk) // 2)
                log.warning("out of memory on a batch of %d; retrying in batches of %d", len(chunk), self.size)
                _free_cached_memory()
                continue
            start += len(chunk)
        return out


def _free_cached_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
