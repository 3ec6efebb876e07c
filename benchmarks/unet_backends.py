"""UNet step latency per backend: eager vs ONNX Runtime vs torch.compile.

    python benchmarks/unet_backends.py [--models nano,mid] [--threads 2] [--repeats 20] [--no-compile]

For each UNet (random weights) and batch 1 and 2 (2 = one image with classifier-free
guidance, the engine's per-step call) prints the median and p90 milliseconds per UNet
call and calls/s, with the export / compile time, the machine, the thread counts
and the load average before and after: on a shared machine the background load
changes every number.

Models:
  nano  the nano preset's UNet (`vlv_engine.config.preset("nano")`, 16x16 latents,
        coordinate channels, Nq 16, D 64);
  mid   a mid-size UNet: SD-like layout at 256 px (32x32 latents), channels
        (64, 128, 256), 2 layers per block, cross-attention to 77 x 768.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def mid_config():
    from vlv_engine.config import preset

    cfg = preset("nano").diffusion
    cfg.unet = {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [64, 128, 256],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "cross_attention_dim": 768,
    }
    cfg.coord_channels = 0
    return cfg, 77


def nano_config():
    from vlv_engine.config import preset

    p = preset("nano")
    return p.diffusion, p.encoder.num_queries


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timeit(fn, repeats: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nano,mid")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes to compile)")
    parser.add_argument("--cache-dir", help="artifact cache (default: a temporary folder, so exports are timed)")
    args = parser.parse_args()

    import torch

    from vlv_engine.engine.backends import EagerUNetRunner
    from vlv_engine.engine.backends.compile_backend import CompiledUNetRunner
    from vlv_engine.engine.backends.onnx_backend import onnx_unet_runner
    from vlv_engine.models import DiffusionDecoder

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    import onnxruntime

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__} ({args.threads} threads), "
          f"onnxruntime {onnxruntime.__version__} ({args.threads} intra-op threads, 1 inter-op)")
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"(the machine is shared: a training run and others' tests)")
    rows = []
    configs = {"nano": nano_config, "mid": mid_config}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or tmp
        for name in args.models.split(","):
            cfg, nq = configs[name]()
            torch.manual_seed(0)
            decoder = DiffusionDecoder.from_config(cfg).eval()
            decoder.requires_grad_(False)
            params = sum(p.numel() for p in decoder.unet.parameters()) / 1e6
            runners = {"eager": (EagerUNetRunner(decoder), 0.0)}
            t0 = time.perf_counter()
            runners["onnxruntime"] = (onnx_unet_runner(decoder, num_queries=nq, max_batch=1, cache_dir=cache_dir,
                                                       threads=args.threads), time.perf_counter() - t0)
            if not args.no_compile:
                runners["compile"] = (CompiledUNetRunner(decoder), None)
            c, h = decoder.vae.config.latent_channels, decoder.unet.config.sample_size
            d = decoder.unet.config.cross_attention_dim
            for batch in (1, 2):
                g = torch.Generator().manual_seed(batch)
                latents = torch.randn(batch, c, h, h, generator=g)
                context = torch.randn(batch, nq, d, generator=g)
                t = torch.tensor(500)
                with torch.no_grad():
                    ref = runners["eager"][0](latents, t, context)
                for backend, (runner, setup_s) in runners.items():
                    if backend == "compile":  # the first call at each batch size compiles
                        t0 = time.perf_counter()
                        runner(latents, t, context)
                        setup_s = time.perf_counter() - t0
                    elif batch > 1:
                        setup_s = None  # export + session: once per model, shown on the batch-1 row
                    with torch.no_grad():
                        err = ((runner(latents, t, context) - ref).norm() / ref.norm()).item()
                        med, p90 = timeit(lambda: runner(latents, t, context), args.repeats, args.warmup)
                    rows.append((name, f"{params:.1f}M", batch, backend, med, p90, 1e3 / med, setup_s, err))
    load_after = os.getloadavg()
    head = ("model", "params", "batch", "backend", "ms/call", "p90 ms", "calls/s", "setup s", "rel err")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, params, batch, backend, med, p90, rate, setup_s, err in rows:
        base = next(r[4] for r in rows if r[0] == name and r[2] == batch and r[3] == "eager")
        setup = "" if not setup_s else f"{setup_s:.1f}"
        print(f"| {name} | {params} | {batch} | {backend} | {med:.2f} | {p90:.2f} | {rate:.1f} "
              f"({base / med:.2f}x) | {setup} | {err:.1e} |")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print("setup s: ONNX export + session (once per model, batch-1 row); torch.compile's first call at that "
          "batch size (each row). rel err: relative L2 error against eager on the same inputs.")


if __name__ == "__main__":
    main()
