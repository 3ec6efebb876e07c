"""Encoder suite: pixels -> caption embedding (Florence-2, queries, phi, CLIP on
embeddings): batch-1 latency and images/s per batch size, fast encoder backend against
the eager fp32 encoder, with the embeddings' relative difference."""

from __future__ import annotations

from vlv_engine.bench.measure import time_calls
from vlv_engine.bench.pipelines import BenchSetup, encode, random_pixels
from vlv_engine.bench.report import Row


def run_encoder(setup: BenchSetup, batches: list[int], *, repeats: int) -> list[Row]:
    rows: list[Row] = []
    backend = setup.notes.get("encoder_backend", "eager")
    for batch in batches:
        pixels = random_pixels(setup.reference, batch, seed=batch)  # [B, 3, S, S]
        out = {}

        def fast():
            out["fast"] = encode(setup.fast, pixels)

        def ref():
            out["ref"] = encode(setup.reference, pixels)

        tf = time_calls(fast, repeats=repeats, warmup=1, device=setup.device)
        tr = time_calls(ref, repeats=repeats, warmup=1, device=setup.device)
        a, b = out["fast"].float().cpu(), out["ref"].float().cpu()
        rel = float((a - b).norm() / b.norm())
        extra = {"backend": backend, "rel_err": f"{rel:.1e}"}
        if batch == 1:
            rows.append(Row("encoder", "latency p50", "ms", 1, tf.median * 1e3, tr.median * 1e3, "lower", extra))
        rows.append(Row("encoder", "throughput", "img/s", batch, batch / tf.median, batch / tr.median, "higher",
                        extra))
    return rows
