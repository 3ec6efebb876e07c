"""End-to-end suite: pixels -> caption tokens (encoder, psi, LLM decode) at a fixed
caption length and the same decoding settings (beams, early stopping, length penalty)
in both pipelines: captions/s per batch size, latency p50/p95 at batch 1, the fast
path's token agreement with the reference, and peak memory while captioning."""

from __future__ import annotations

from vlv_engine.bench.measure import PeakMemory, time_calls
from vlv_engine.bench.pipelines import BenchSetup, caption_tokens, random_pixels, token_match
from vlv_engine.bench.report import Row


def run_e2e(setup: BenchSetup, batches: list[int], *, repeats: int, latency_repeats: int | None = None) -> list[Row]:
    gen = setup.generation()
    eos = setup.never_eos
    rows: list[Row] = []
    for i, batch in enumerate(batches):
        pixels = random_pixels(setup.reference, batch, seed=100 + batch)
        out = {}

        def fast():
            out["fast"] = caption_tokens(setup.fast, setup.fast_decoder, pixels, gen, eos)

        def ref():
            out["ref"] = caption_tokens(setup.reference, setup.reference_decoder, pixels, gen, eos)

        n = (latency_repeats or repeats) if batch == 1 else repeats
        with PeakMemory(setup.device) as mem_fast:
            tf = time_calls(fast, repeats=n, warmup=1, device=setup.device)
        with PeakMemory(setup.device) as mem_ref:
            tr = time_calls(ref, repeats=n, warmup=1 if i == 0 else 0, device=setup.device)
        assert out["fast"].shape[1] == setup.new_tokens, "the caption length is not fixed"
        extra = {"beams": gen.num_beams, "tokens": setup.new_tokens,
                 "token_match": round(token_match(out["fast"], out["ref"]), 3),
                 "rss_GB": round(mem_fast.peak_rss / 2**30, 2), "ref_rss_GB": round(mem_ref.peak_rss / 2**30, 2)}
        if setup.device.type == "cuda":
            extra.update(max_alloc_GB=round(mem_fast.peak_cuda / 2**30, 2),
                         ref_max_alloc_GB=round(mem_ref.peak_cuda / 2**30, 2))
        rows.append(Row("e2e", "captions/s", "cap/s", batch, batch / tf.median, batch / tr.median, "higher", extra))
        if batch == 1:
            rows.append(Row("e2e", "latency p50", "s", 1, tf.median, tr.median, "lower"))
            rows.append(Row("e2e", "latency p95", "s", 1, tf.percentile(95), tr.percentile(95), "lower"))
    return rows
