"""Throughput of the batch captioner against the bare model, in one process.

    python benchmarks/batch_caption.py [--preset nano] [--model DIR] [--n 1024] [--batch-size 32]
                                       [--workers 1] [--threads 1] [--repeats 2] [--profile]
                                       [--self-check-steps 8] [--ray-actors 2]

Reports images/s of
  * ``engine.caption`` on images decoded beforehand (the model alone, the reference),
  * ``caption_dataset`` on the files (decode workers, hashing, manifest, fsync),
  * ``vlv caption`` (``cli.main``, adding model load and worker start),
each as the best of ``--repeats`` runs taken in turn (a shared machine's load moves
between runs), with the ratio to the reference, the peak RSS and the machine.
Optional rows, each run once: ``--self-check-steps N`` adds ``caption_dataset`` with
the self-check (N redraw steps; the model then carries its diffusion decoder), and
``--ray-actors N`` adds ``caption_dataset`` on a local Ray cluster of N engine actors
(its start-up, which is seconds, included).

Without ``--model`` the model is the ``--preset`` architecture (default nano, the
bundled Shapes World model's) with random weights, saved to a temporary folder so
``vlv caption`` loads the same weights: its captions are random words, which is what
the throughput of a model of that size needs.  ``--profile`` prints where the
``caption_dataset`` process spends its time (cProfile, cumulative).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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


def _random_engine(preset_name: str, folder: Path, with_diffusion: bool = False):
    import torch

    from vlv_engine import Engine
    from vlv_engine.config import preset
    from vlv_engine.models import VLVModel
    from vlv_engine.testing.tiny import tiny_tokenizers

    torch.manual_seed(0)
    config = preset(preset_name)
    model = VLVModel.from_config(config, with_diffusion=with_diffusion)
    llm_tok, text_tok = tiny_tokenizers(config)
    engine = Engine(model.eval(), llm_tokenizer=llm_tok, text_tokenizer=text_tok)
    engine.save_pretrained(folder)
    return Engine.from_pretrained(folder, load_diffusion=with_diffusion)


def _best(times: list[float], n: int) -> float:
    return n / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the --preset architecture, random weights)")
    parser.add_argument("--preset", default="nano", help="architecture when no --model is given (tiny, nano)")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile one caption_dataset run")
    parser.add_argument("--self-check-steps", type=int, default=0, help="add a self-check row (0: none)")
    parser.add_argument("--ray-actors", type=int, default=0, help="add a Ray row with this many actors (0: none)")
    args = parser.parse_args()
    import torch

    from vlv_engine import Engine
    from vlv_engine.batch import JobOptions, caption_dataset
    from vlv_engine.batch.jsonl import encode_lines  # noqa: F401  (imported before timing)
    from vlv_engine.cli import main as cli_main
    from vlv_engine.images import load_image

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # so cli.main keeps it
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.model:
            model_dir, what = args.model, args.model
            engine = Engine.from_pretrained(args.model, load_diffusion=False)
        else:
            model_dir, what = str(tmp_path / "model"), f"{args.preset} architecture, random weights"
            engine = _random_engine(args.preset, tmp_path / "model", with_diffusion=args.self_check_steps > 0)
        folder = tmp_path / "images"
        folder.mkdir()
        files = _images(folder, args.n)
        decoded = [load_image(p) for p in files]
        engine.caption(decoded[: args.batch_size], batch_size=args.batch_size)  # warm-up

        times: dict[str, list[float]] = {"model": [], "api": [], "cli": []}
        reference = None
        for r in range(args.repeats):
            t = time.perf_counter()
            reference = engine.caption(decoded, batch_size=args.batch_size)
            times["model"].append(time.perf_counter() - t)

            out = tmp_path / f"a{r}.jsonl"
            t = time.perf_counter()
            summary = caption_dataset(engine, [str(folder)], JobOptions(out=out, batch_size=args.batch_size,
                                                                        workers=args.workers))
            times["api"].append(time.perf_counter() - t)
            assert summary.captioned == args.n

            out = tmp_path / f"b{r}.jsonl"
            t = time.perf_counter()
            rc = cli_main(["caption", str(folder), "--out", str(out), "--batch-size", str(args.batch_size),
                           "--workers", str(args.workers), "--quiet", "--model", model_dir])
            times["cli"].append(time.perf_counter() - t)
            assert rc == 0
        import json

        got = [json.loads(line)["caption"] for line in out.read_text().splitlines()]
        assert got == reference, "vlv caption wrote other captions than engine.caption"

        extra: dict[str, float] = {}
        if args.self_check_steps:
            from vlv_engine.batch.selfcheck import SelfCheckOptions

            t = time.perf_counter()
            caption_dataset(engine, [str(folder)], JobOptions(out=tmp_path / "s.jsonl", batch_size=args.batch_size,
                                                             workers=args.workers,
                                                             self_check=SelfCheckOptions(steps=args.self_check_steps)))
            extra[f"caption_dataset --self-check ({args.self_check_steps} steps)"] = \
                args.n / (time.perf_counter() - t)
        if args.ray_actors:
            import ray

            ray.init(num_cpus=args.ray_actors, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            t = time.perf_counter()
            caption_dataset(engine, [str(folder)], JobOptions(out=tmp_path / "r.jsonl", batch_size=args.batch_size,
                                                             ray=True, ray_actors=args.ray_actors))
            extra[f"caption_dataset on Ray, {args.ray_actors} actors"] = args.n / (time.perf_counter() - t)
            ray.shutdown()
            assert [json.loads(line)["caption"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] \
                == reference

        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            caption_dataset(engine, [str(folder)], JobOptions(out=tmp_path / "p.jsonl", batch_size=args.batch_size,
                                                             workers=args.workers))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

    model_ips, api_ips, cli_ips = (_best(times[k], args.n) for k in ("model", "api", "cli"))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {args.threads} thread(s), {args.workers} decode worker(s)")
    print(f"model: {what}; {args.n} images (24-96 px PNG), batch {args.batch_size}, best of {args.repeats}; "
          f"peak RSS {rss_mb:.0f} MB")
    print(f"  engine.caption, pre-decoded images : {model_ips:8.1f} images/s")
    print(f"  caption_dataset on the files       : {api_ips:8.1f} images/s ({api_ips / model_ips:.0%})")
    print(f"  vlv caption (incl. model load)     : {cli_ips:8.1f} images/s ({cli_ips / model_ips:.0%})")
    for name, ips in extra.items():
        print(f"  {name}: {ips:8.1f} images/s ({ips / model_ips:.0%})")


if __name__ == "__main__":
    main()
