"""Throughput of the batch captioner against the bare model, in one process.

    python benchmarks/batch_caption.py [--n 2048] [--batch-size 32] [--workers 1] [--threads 1]

Reports images/s of
  * ``engine.caption`` on images decoded beforehand (the model alone),
  * ``caption_dataset`` on the files (decode workers, hashing, manifest, fsync per batch),
  * ``vlv caption`` (``cli.main``, adding model load and worker start),
with the machine and its load average, since a busy machine changes everything.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

# Heavy imports live in main(): decode workers are spawned, and a spawned process
# imports the main module again; torch there would add seconds to each worker's start.


def _images(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(24, 96, 2))
        path = folder / f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the bundled tiny model)")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    import torch

    from vlv_engine import Engine
    from vlv_engine.batch import JobOptions, caption_dataset
    from vlv_engine.cli import main as cli_main
    from vlv_engine.images import load_image

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # so cli.main keeps it
    engine = Engine.from_pretrained(args.model, load_diffusion=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        files = _images(folder, args.n)
        decoded = [load_image(p) for p in files]
        engine.caption(decoded[: args.batch_size], batch_size=args.batch_size)  # warm-up

        t = time.perf_counter()
        reference = engine.caption(decoded, batch_size=args.batch_size)
        model_ips = args.n / (time.perf_counter() - t)

        t = time.perf_counter()
        summary = caption_dataset(engine, [str(folder)], JobOptions(out=Path(tmp) / "a.jsonl",
                                                                    batch_size=args.batch_size,
                                                                    workers=args.workers))
        api_ips = args.n / (time.perf_counter() - t)
        assert summary.captioned == args.n

        t = time.perf_counter()
        rc = cli_main(["caption", str(folder), "--out", str(Path(tmp) / "b.jsonl"), "--batch-size",
                       str(args.batch_size), "--workers", str(args.workers), "--quiet"]
                      + (["--model", args.model] if args.model else []))
        cli_ips = args.n / (time.perf_counter() - t)
        assert rc == 0
        cli_captions = [line for line in (Path(tmp) / "b.jsonl").read_text().splitlines()]
        assert len(cli_captions) == len(reference)

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {args.threads} thread(s), {args.workers} decode worker(s)")
    print(f"{args.n} images, batch {args.batch_size}")
    print(f"  engine.caption, pre-decoded images : {model_ips:8.1f} images/s")
    print(f"  caption_dataset on the files       : {api_ips:8.1f} images/s ({api_ips / model_ips:.0%})")
    print(f"  vlv caption (incl. model load)     : {cli_ips:8.1f} images/s ({cli_ips / model_ips:.0%})")


if __name__ == "__main__":
    main()
