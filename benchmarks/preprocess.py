"""Image preprocessing: native extension vs the Pillow + torch path it reproduces.

    python benchmarks/preprocess.py [--batch 32] [--sizes 768,64] [--repeats 3] [--threads N]

A batch of mixed-size synthetic photos (smooth gradients, hard edges and noise, at
640x480, 1024x768, 800x1200 and 3000x2000, cycled) is turned into the normalised
``[B, 3, S, S]`` float32 tensor by

  reference   vlv_engine.native.preprocess_batch_reference: load_image + Pillow
              bicubic resize + numpy/torch normalisation, one image at a time
              (what images.preprocess does without the extension);
  native      vlv_engine.native.preprocess_batch with all threads, and with 1.

Prints median seconds per batch, images/s, input megapixels/s, the ratio to the
reference measured in the same process, peak RSS above the start of each call
(sampled), whether the outputs are equal, and the machine with its load average
before and after: on a shared machine the background load moves every number.
"""

from __future__ import annotations

import argparse
import gc
import os

import numpy as np
import torch

from vlv_engine import native
from vlv_engine.bench.machine import cpu_name
from vlv_engine.bench.measure import PeakMemory, current_rss, time_calls

SHAPES = [(480, 640), (768, 1024), (1200, 800), (2000, 3000)]  # (height, width)
MEAN = (0.485, 0.456, 0.406)  # Florence-2's (ImageNet) statistics
STD = (0.229, 0.224, 0.225)


def synthetic_photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    planes = []
    for c in range(3):
        smooth = 128 + 90 * np.sin(6 * x + 2 * c + seed) * np.cos(4 * y - c)
        edges = 50 * (((x * 11 + y * 7 + c) % 1.0) > 0.5)
        planes.append(smooth + edges + rng.normal(0, 8, (h, w)).astype(np.float32))
    return np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)


def measure(fn, repeats: int) -> tuple[float, int, torch.Tensor]:
    """(median seconds, peak RSS above the start in bytes, last output)."""
    out: dict[str, torch.Tensor] = {}
    gc.collect()
    base = current_rss()
    with PeakMemory(torch.device("cpu"), interval=0.002) as peak:
        out["x"] = fn()
    timing = time_calls(lambda: out.__setitem__("x", fn()), repeats=repeats, warmup=0)
    return timing.median, peak.peak_rss - base, out["x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", default="768,64", help="output sizes (square), comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="native threads (default: all CPUs we may use)")
    args = parser.parse_args()

    if not native.available():
        raise SystemExit("the native extension is not available here (see the log line above); nothing to compare")
    from vlv_engine.native._loader import num_threads

    threads = num_threads(args.threads)
    images = [synthetic_photo(*SHAPES[i % len(SHAPES)], seed=i) for i in range(args.batch)]
    megapixels = sum(a.shape[0] * a.shape[1] for a in images) / 1e6
    shapes = ", ".join(f"{w}x{h}" for h, w in SHAPES)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, SIMD {native.simd_level()}, "
          f"load average {os.getloadavg()[0]:.1f} before")
    print(f"batch: {args.batch} photos cycling {shapes} ({megapixels:.1f} MP in all), float32 output, "
          f"median of {args.repeats}")
    print(f"{'size':>5} {'path':<18} {'s/batch':>8} {'img/s':>7} {'MP/s':>7} {'x ref':>6} {'peak RSS':>9}  equal")
    for size in (int(s) for s in args.sizes.split(",")):
        ref_s, ref_mem, ref = measure(lambda: native.preprocess_batch_reference(images, size, MEAN, STD),
                                      args.repeats)
        rows = [("reference", ref_s, ref_mem, True)]
        for label, n in ((f"native {threads} thr", threads), ("native 1 thr", 1)):
            t, mem, out = measure(lambda: native.preprocess_batch(images, size, MEAN, STD, num_threads=n),
                                  args.repeats)
            rows.append((label, t, mem, torch.equal(out, ref)))
        for label, t, mem, equal in rows:
            print(f"{size:>5} {label:<18} {t:>8.3f} {args.batch / t:>7.1f} {megapixels / t:>7.1f} "
                  f"{ref_s / t:>6.2f} {mem / 2**20:>7.0f}MB  {equal}")
    print(f"load average {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
