"""`vlv bench`'s unet suite (vlv_engine.bench.unet) on the tiny model's ONNX export."""

import pytest
import torch


def test_unet_suite_on_tiny(cache_env):
    from vlv_engine.bench.unet import run_unet, unet_bench_model

    cpu = torch.device("cpu")
    bench = unet_bench_model("tiny", device=cpu, dtype=torch.float32)
    bench.steps = 3
    # max_batch 8: the contract of the session's shared tiny export (conftest.onnx_unet)
    rows = run_unet(bench, device=cpu, batches=[1, 2], repeats=1, backend="onnx", max_batch=8)
    assert [(r.metric, r.batch) for r in rows] == [("UNet call p50", 1), ("UNet call p50", 2),
                                                  ("reconstruction, 3 steps", 1)]
    assert all(r.extra["backend"] == "onnx" and r.fast > 0 and r.reference > 0 for r in rows)
    assert all(r.extra["rss_GB"] > 0 and r.extra["ref_rss_GB"] > 0 for r in rows)
    assert all(float(r.extra["rel_err"]) < 1e-4 for r in rows[:2])
    assert float(rows[-1].extra["max_diff_uint8"]) <= 1.0  # the ONNX draw is the eager draw


def test_unet_suite_refuses_what_it_cannot_run():
    from vlv_engine.bench.unet import unet_bench_model

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="GPU only"):
        unet_bench_model("paper", device=cpu, dtype=torch.float16)
    with pytest.raises(ValueError, match="caption-only"):
        unet_bench_model("small", device=cpu, dtype=torch.float32)
