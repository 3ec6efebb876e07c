"""Preprocess suite: uint8 images -> normalized pixel batch with the native extension
(`vlv_engine.native.preprocess_batch`) against its plain reference
(`preprocess_batch_reference`); skipped with the reason when the extension is absent."""

from __future__ import annotations

import numpy as np

from vlv_engine.bench.measure import time_calls
from vlv_engine.bench.report import Row


class SuiteUnavailable(RuntimeError):
    pass


def _native():
    try:
        from vlv_engine.native import available, preprocess_batch, preprocess_batch_reference
    except ImportError as err:
        raise SuiteUnavailable(f"vlv_engine.native is not importable ({err})") from None
    if not available():  # preprocess_batch would run the reference itself
        raise SuiteUnavailable("the native extension is not built here (or VLV_NATIVE=0): see CMakeLists.txt")
    return preprocess_batch, preprocess_batch_reference


def run_preprocess(config, *, batches: list[int], repeats: int) -> list[Row]:
    fast, ref = _native()
    enc = config.encoder
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        # Photos of mixed sizes, as a captioning job sees them.
        images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
                  for h, w in rng.integers(300, 1200, (batch, 2))]
        args = (images, enc.image_size, enc.image_mean, enc.image_std)
        out = {}
        try:
            tf = time_calls(lambda: out.__setitem__("f", fast(*args)), repeats=repeats, warmup=1)
        except TypeError as err:
            raise SuiteUnavailable(f"preprocess_batch(images, size, mean, std) is not callable as such: {err}") from err
        tr = time_calls(lambda: out.__setitem__("r", ref(*args)), repeats=repeats, warmup=1)
        f, r = np.asarray(out["f"], dtype=np.float32), np.asarray(out["r"], dtype=np.float32)
        rows.append(Row("preprocess", "throughput", "img/s", batch, batch / tf.median, batch / tr.median, "higher",
                        {"max_abs_diff": f"{float(np.abs(f - r).max()):.1e}"}))
    return rows
