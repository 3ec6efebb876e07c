"""`vlv bench`: the caption fast path measured beside the reference pipeline, in one process.

Every figure is a pair (fast path, reference) measured in the same run, reported with
their ratio, the machine (`machine.py`), the memory bandwidth measured by a large copy,
and peak memory. Suites, one module each: encoder, decode, e2e, memory, unet, preprocess.
"""

from vlv_engine.bench.report import Row
from vlv_engine.bench.runner import SUITES, BenchOptions, run_bench

__all__ = ["SUITES", "BenchOptions", "Row", "run_bench"]
