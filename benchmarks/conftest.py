"""pytest-benchmark suites of the caption fast path (`python -m pytest benchmarks -p no:cacheprovider`).

Not part of the default test run (pyproject's testpaths is tests/). Each suite times the
fast path and the reference pipeline in one session, in the same benchmark group, on the
tiny preset by default (VLV_BENCH_PRESET=nano for the bundled model); the decode step
and the encoder are compiled only with VLV_BENCH_COMPILE=1 (a compile takes tens of
seconds on a CPU). `vlv bench` is the full benchmark with ratios, JSON and plots.
"""

import os

import pytest
import torch


@pytest.fixture(scope="session")
def bench_setup():
    from vlv_engine.bench.pipelines import build_setup

    compile_ = os.environ.get("VLV_BENCH_COMPILE") == "1"
    torch.set_num_threads(int(os.environ.get("VLV_BENCH_THREADS", "1")))
    return build_setup(os.environ.get("VLV_BENCH_PRESET", "tiny"), compile_decoder=compile_,
                       encoder_backend="auto" if compile_ else "eager")


@pytest.fixture(scope="session")
def pixels(bench_setup):
    from vlv_engine.bench.pipelines import random_pixels

    return {b: random_pixels(bench_setup.reference, b, seed=b) for b in (1, 8)}
