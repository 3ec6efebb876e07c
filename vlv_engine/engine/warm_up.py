"""Which batch sizes a warm-up must caption so that nothing compiles under traffic.

An engine with compiled parts (the compiled decoder; the compile or triton encoder
backend) builds code for each batch bucket on first use, and on CUDA captures its
graphs: minutes on a CPU for the small preset. Decode buckets are 1, 2, 4, ..., 64 rows
(`decode.DEFAULT_BATCH_BUCKETS`; a larger batch runs in chunks of 64) and the encoder's
are powers of two up to its batch size, so one batch per power of two below the
largest size, and one of the largest, reaches every bucket either can use.
"""

from __future__ import annotations

from typing import Any

from vlv_engine.engine.decode import DEFAULT_BATCH_BUCKETS


def compiles(engine: Any) -> bool:
    """Whether the engine builds code per batch bucket on first use."""
    backend = getattr(engine, "encoder_backend", None)
    return getattr(engine, "decoder", None) == "compiled" or getattr(backend, "name", "eager") != "eager"


def warm_up_sizes(engine: Any, max_batch_size: int) -> list[int]:
    """Batch sizes that reach every bucket a batch of up to `max_batch_size` images uses;
    [1] for an engine that compiles nothing (its first call only allocates)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if not compiles(engine):
        return [1]
    return [b for b in DEFAULT_BATCH_BUCKETS if b < max_batch_size] + [max_batch_size]
