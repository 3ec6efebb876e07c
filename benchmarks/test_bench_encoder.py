"""Encoder path (pixels -> caption embedding): the fast backend against eager fp32."""

import pytest

from vlv_engine.bench.pipelines import encode


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_encoder(benchmark, bench_setup, pixels, batch, path):
    engine = bench_setup.reference if path == "reference" else bench_setup.fast
    benchmark.group = f"encoder batch {batch}"
    out = benchmark.pedantic(encode, args=(engine, pixels[batch]), rounds=5, warmup_rounds=1)
    ref = encode(bench_setup.reference, pixels[batch])
    assert out.shape == ref.shape
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-3
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
