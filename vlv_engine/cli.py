"""The `vlv` command line: caption | reconstruct | eval | train | convert | serve | bench.

Each subcommand is a thin layer over the Python API (`vlv_engine.Engine`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
# The keys of vlv_engine.models.diffusion.SAMPLERS, spelled out so that parsing
# arguments does not import diffusers (a test keeps the two equal).
SAMPLER_NAMES = ["ddpm", "ddim", "dpm", "dpm-sde"]
DECODER_NAMES = ["static", "compiled", "reference"]  # vlv_engine.engine.decode.DECODERS, likewise
ENCODER_QUANT_NAMES = ["int8_dynamic", "bf16", "auto"]  # encoder_quant.ENCODER_PREFERENCES, likewise
ENCODER_BACKEND_NAMES = ["eager", "auto", "compile", "triton"]  # encoder_select.ENCODER_PREFERENCES, likewise

log = logging.getLogger("vlv")


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files as given; folders expanded recursively to their image files, sorted."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out.extend(str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(item)  # a missing file is reported per item, not here
    return out


def _load_engine(args: argparse.Namespace, device: str | None = None, **kwargs):
    import torch

    from vlv_engine import Engine

    if getattr(args, "quantize", None):
        kwargs.setdefault("quantize", args.quantize)
    if getattr(args, "encoder_quantize", None):
        kwargs.setdefault("encoder_quantize", args.encoder_quantize)
    if getattr(args, "decoder", None):
        kwargs.setdefault("decoder", args.decoder)
    if getattr(args, "encoder_backend", None):
        kwargs.setdefault("encoder_backend", args.encoder_backend)
    return Engine.from_pretrained(args.model, device=device or args.device, dtype=getattr(torch, DTYPES[args.dtype]),
                                  **kwargs)


def _ray_engines(args: argparse.Namespace, options) -> None:
    # Each actor loads the model itself, onto its own device (Ray gives a GPU actor
    # one visible GPU, so "cuda" is that GPU), rather than unpickling the driver's copy.
    import functools

    import torch

    from vlv_engine import Engine

    options.engine_factory = functools.partial(Engine.from_pretrained, args.model, device=args.device,
                                               dtype=getattr(torch, DTYPES[args.dtype]),
                                               load_diffusion=args.self_check, quantize=args.quantize,
                                               encoder_quantize=args.encoder_quantize, decoder=args.decoder,
                                               encoder_backend=args.encoder_backend)


def cmd_caption(args: argparse.Namespace) -> int:
    from vlv_engine.batch import (InputSpecError, JobOptions, ManifestError, OutputError, UsageError,
                                  caption_dataset, collect_items)

    workers = args.workers if args.workers is not None else max(1, min(8, (os.cpu_count() or 2) // 2))
    generation = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v}
    if args.postprocess:
        generation["postprocess"] = True
    options = JobOptions(out=args.out, format=args.format, manifest=args.manifest, errors=args.errors,
                         batch_size=args.batch_size, workers=workers, shard_index=args.shard_index,
                         num_shards=args.num_shards, retry_failed=args.retry_failed,
                         embedding_cache=args.embedding_cache, generation=generation,
                         image_column=args.image_column, progress=not args.quiet,
                         flush_seconds=args.flush_seconds, ray=args.ray, ray_address=args.ray_address,
                         ray_actors=args.ray_actors)
    if args.self_check:
        from vlv_engine.batch.selfcheck import SelfCheckOptions

        try:
            options.self_check = SelfCheckOptions(steps=args.self_check_steps, threshold=args.self_check_threshold,
                                                  guidance_scale=args.self_check_guidance,
                                                  seed=args.self_check_seed)
        except ValueError as err:
            print(f"vlv caption: --self-check: {err}", file=sys.stderr)
            return EXIT_USAGE
    if args.max_pixels is not None:
        options.max_pixels = args.max_pixels or None  # 0: no limit of ours (Pillow's still applies)
    try:
        # Inputs first: a wrong path is reported before the model is loaded.
        items = collect_items(args.inputs, image_column=args.image_column, shard_index=args.shard_index,
                              num_shards=args.num_shards)
        if not items:
            print("vlv caption: no input images found", file=sys.stderr)
            return EXIT_USAGE
        on_failure = None if args.quiet else _report_failure
        if args.ray:
            _ray_engines(args, options)
            # revisions, settings (the encoder backend changes neither: the driver's stays eager)
            engine = _load_engine(args, load_diffusion=args.self_check, device="cpu", encoder_backend="eager")
            summary = caption_dataset(engine, items, options, on_failure=on_failure)
        else:
            from vlv_engine.batch.decode import DecodePool

            # Decode workers start while the model loads.
            with DecodePool(workers).start() as pool:
                engine = _load_engine(args, load_diffusion=args.self_check)
                _share_cores_with_decoders(args.device, workers)
                summary = caption_dataset(engine, items, options, on_failure=on_failure, decode_pool=pool)
    except (InputSpecError, OutputError, ManifestError, UsageError) as err:
        print(f"vlv caption: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vlv caption: interrupted; finished batches are kept, rerun the command to continue", file=sys.stderr)
        return 130  # the shell's code for SIGINT
    if not args.quiet:
        where = f" (listed in {summary.paths.errors})" if summary.failed and summary.paths.errors else ""
        print(f"vlv caption: {summary.total} items: {summary.captioned} captioned, {summary.reused} reused, "
              f"{summary.already_done} done before, {summary.failed} failed{where}; {summary.seconds:.1f} s, "
              f"{summary.images_per_second():.1f} images/s", file=sys.stderr)
        if options.self_check:
            print(f"vlv caption: the self-check flagged {summary.flagged} of the records written in this run "
                  f"(self_check_score < {options.self_check.threshold})", file=sys.stderr)
    return EXIT_FAILURES if summary.failed else EXIT_OK


def _share_cores_with_decoders(device: str, workers: int) -> None:
    # On a CPU the model's thread team and the decode processes would oversubscribe
    # the cores, and an OpenMP team with a descheduled thread stalls every op.  An
    # explicit OMP_NUM_THREADS wins.
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))


def _report_failure(item, reason: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"vlv caption: {item.path}: {reason}", file=sys.stderr)  # keeps the progress bar intact


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from vlv_engine.images import ImageInputError

    paths = expand_inputs(args.inputs)
    engine = _load_engine(args, load_caption_decoder=False)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in paths:
        try:
            (image,) = engine.reconstruct([path], steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                                              sampler=args.sampler)
        except ImageInputError as err:  # this item only
            failures += 1
            print(f"vlv reconstruct: {err}", file=sys.stderr)
            continue
        target = out_dir / (Path(path).stem + ".png")
        image.save(target)
        print(json.dumps({"path": path, "reconstruction": str(target)}))
    return EXIT_FAILURES if failures else EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from vlv_engine.checkpoint.official import convert_official

    convert_official(args.out, stage2=args.stage2, stage1=args.stage1, florence2=args.florence2,
                     stable_diffusion=args.stable_diffusion, llm=args.llm,
                     dtype=getattr(torch, DTYPES[args.dtype]))
    print(f"wrote {args.out}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from vlv_training.config import load_config
        from vlv_training.trainer import train
    except ImportError as err:
        print(f"vlv train: the training package is not installed ({err}); pip install -e '.[train]'",
              file=sys.stderr)
        return EXIT_USAGE
    overrides = [f"stage={args.stage}", *args.set]
    cfg = load_config(args.config, overrides)
    summary = train(cfg, device=args.device, progress=not args.quiet)
    print(json.dumps(summary))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from vlv_engine.evaluation import evaluate_shapes

    engine = _load_engine(args, load_diffusion=args.recon_num > 0)
    generation = {"num_beams": args.num_beams} if args.num_beams else {}
    report = evaluate_shapes(engine, num=args.num, seed=args.seed, recon_num=args.recon_num, steps=args.steps,
                             guidance_scale=args.guidance_scale, sampler=args.sampler, batch_size=args.batch_size,
                             **generation)
    data = report.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    c, s, d = report.caption, report.caption_single, report.caption_double
    print(f"captions ({int(c['n'])} scenes): exact match {c['exact_match']:.1%}  object F1 {c['f1']:.3f}  "
          f"(one object {s['exact_match']:.1%}, two objects {d['exact_match']:.1%})")
    if report.reconstruction is not None:
        r = report.reconstruction
        print(f"reconstruction ({int(r['n'])} single-object scenes): colour+cell {r['color_and_cell']:.1%}  "
              f"colour {r['color']:.1%}  cell {r['cell']:.1%}")
    for ex in report.examples:
        print(f"  truth: {ex['truth']}\n   said: {ex['caption']}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        print(f"vlv serve: the web stack is not installed ({err}); pip install -e '.[serve]'", file=sys.stderr)
        return EXIT_USAGE
    from vlv_engine.serve import ServeConfig, build_server
    from vlv_engine.serve.server import run_server

    try:
        config = ServeConfig(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                             max_queue=args.max_queue, max_body_mb=args.max_body_mb, max_images=args.max_images,
                             max_pixels=args.max_pixels or None, timeout_s=args.timeout_s,
                             torch_threads=_serve_threads(args),
                             model_name=Path(args.model).name if args.model else "default")
    except ValueError as err:
        print(f"vlv serve: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.model is not None and not Path(args.model).is_dir():
        print(f"vlv serve: model folder {args.model!r} not found", file=sys.stderr)
        return EXIT_USAGE
    # The model loads after the server is up: /healthz answers at once, /readyz when warmed.
    server = build_server(config, engine_factory=lambda: _load_engine(args, load_diffusion=False),
                          host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    print(f"vlv serve: http://{args.host}:{args.port} (POST /v1/caption, GET /healthz /readyz /metrics)",
          file=sys.stderr)
    run_server(server)  # returns after a graceful shutdown (SIGTERM / Ctrl-C)
    load_error = server.config.app.state.service.load_error
    if load_error is not None:
        print(f"vlv serve: the model failed to load: {load_error}", file=sys.stderr)
    return EXIT_OK if server.started and load_error is None else EXIT_FAILURES


def cmd_bench(args: argparse.Namespace) -> int:
    from vlv_engine.bench import BenchOptions, run_bench

    opts = BenchOptions(preset=args.preset, suites=tuple(args.suites), batch_sizes=tuple(args.batch_sizes),
                        e2e_batch_sizes=tuple(args.e2e_batch_sizes) if args.e2e_batch_sizes else None,
                        out=Path(args.out) if args.out else None, device=args.device, fast_dtype=args.fast_dtype,
                        quantize=args.quantize, encoder_quantize=args.encoder_quantize,
                        decode_schemes=tuple(args.decode_schemes),
                        compile_decoder=not args.no_compile, encoder_backend=args.encoder_backend,
                        encoder_batch_size=args.encoder_batch_size, unet_backend=args.unet_backend,
                        new_tokens=args.new_tokens, num_beams=args.num_beams, repeats=args.repeats,
                        latency_repeats=args.latency_repeats, threads=args.threads, memory_batch=args.memory_batch,
                        time_limit_s=args.time_limit)
    try:
        result = run_bench(opts, log=lambda msg: print(f"vlv bench: {msg}", file=sys.stderr, flush=True))
    except ValueError as err:
        print(f"vlv bench: {err}", file=sys.stderr)
        return EXIT_USAGE
    m = result.machine
    print(f"machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), gpu: {m['gpu']}, "
          f"torch {m['torch']}, transformers {m['transformers']}, torchao {m['torchao']}; "
          f"copy bandwidth {m['memory_bandwidth_GBps']} GB/s; load average {m['load_average']}")
    if result.setup:
        print("setup: " + ", ".join(f"{k}={v}" for k, v in result.setup.items()))
    print(result.table)
    for suite, why in result.skipped.items():
        print(f"skipped {suite}: {why}")
    if result.json_path:
        print(f"wrote {result.json_path}" + (f" and {result.plot_path}" if result.plot_path else ""))
    return EXIT_OK


def _serve_threads(args: argparse.Namespace) -> int | None:
    # The event loop and image decoding need a core beside the model (see ServeConfig);
    # an explicit --threads or OMP_NUM_THREADS wins.
    if args.threads is not None:
        return args.threads
    if args.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        return max(1, (os.cpu_count() or 1) - 1)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlv", description="Caption images with a VLV auto-encoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        if p.prog.split()[-1] in ("caption", "eval", "serve"):
            p.add_argument("--quantize", help="quantize the caption LLM: int8_cpu (CPU, native kernel, batch 1), "
                                              "int8_dynamic_cpu (CPU, fbgemm, beams and batches), "
                                              "int8_dynamic, int4_cpu, int8_weight_only, int4_weight_only, fp8 "
                                              "(vlv_engine/engine/quantize.py)")
            p.add_argument("--encoder-quantize", choices=ENCODER_QUANT_NAMES,
                           help="reduced precision for Florence-2 in the encoder path (CPU, float32): "
                                "int8_dynamic (int8 linears; nano Shapes World exact match 91.0 %% vs 91.6 %% in "
                                "fp32), bf16 (CPUs with AMX or AVX512-BF16) or auto (bf16 with AMX, else int8)")
            p.add_argument("--decoder", default="static", choices=DECODER_NAMES,
                           help="the LLM decode loop: static (static KV cache, eager step; the default), "
                                "compiled (the step under torch.compile: faster per token, compiles once per "
                                "batch bucket, ~1 min each on a CPU; for long jobs) or reference (HF generate)")
            p.add_argument("--encoder-backend", default="eager", choices=ENCODER_BACKEND_NAMES,
                           help="pixels -> caption embedding: eager (the default), compile (torch.compile, "
                                "also with --encoder-quantize; on a CPU a 768 px model first compiles ~1-1.5 "
                                "min per batch bucket), triton (CUDA) or auto (the fastest this machine runs)")

    def sampler_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sampler", choices=SAMPLER_NAMES,
                       help="ddpm (the official sampler), ddim, dpm (DPM-Solver++) or dpm-sde (its stochastic "
                            "variant: the most accurate at 10-20 steps); default: the model's own scheduler")

    p = sub.add_parser("caption", help="caption images exactly once (resumable); JSONL {id, path, caption, ...}")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), globs, @list.txt (one per line), "
                                             "webdataset .tar shards, .parquet files")
    model_args(p)
    p.add_argument("--out", help="a .jsonl or .parquet file, or a folder for --format tar (default: JSONL on "
                                 "stdout, nothing kept for a rerun)")
    p.add_argument("--format", choices=["jsonl", "txt", "tar", "parquet"],
                   help="jsonl (default), txt (sidecars next to the images), tar (webdataset shards), "
                        "parquet (needs pyarrow); default from --out's suffix")
    p.add_argument("--errors", help="failed items as JSONL {id, path, reason} (default: beside --out)")
    p.add_argument("--manifest", help="the job's state, SQLite (default: beside --out; required for txt)")
    p.add_argument("--batch-size", type=int, default=8, help="starting batch size; halved on out-of-memory")
    p.add_argument("--workers", type=int, help="image decoding processes (default: half the cores, at most 8; "
                                               "0: decode in this process)")
    p.add_argument("--max-pixels", type=int, help="refuse larger images, from their header "
                                                  "(default 64 Mi pixels; 0: Pillow's limit only)")
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--postprocess", action="store_true", help="official trimming: cut at the last period, "
                                                              "drop repeated sentences")
    p.add_argument("--shard-index", type=int, default=0, help="this task's shard of a cluster array")
    p.add_argument("--num-shards", type=int, default=1, help="shards in the array (items split by a stable "
                                                             "hash of their id; each shard has its own files)")
    p.add_argument("--retry-failed", action="store_true", help="try the items that failed before again")
    p.add_argument("--embedding-cache", metavar="DIR", help="keep caption embeddings here, so new generation "
                                                            "settings or decoders skip the image encoder")
    p.add_argument("--image-column", help="parquet inputs: the column holding image bytes or paths")
    p.add_argument("--flush-seconds", type=float, default=1.0, help="write, fsync and commit finished batches "
                                                                   "this often: the most work a crash can cost "
                                                                   "(0: after every batch)")
    p.add_argument("--self-check", action="store_true",
                   help="redraw each image from its caption embedding and score the caption's fidelity "
                        "(self_check_score in [0, 1], self_check_low below the threshold); needs a model with "
                        "its diffusion decoder")
    p.add_argument("--self-check-steps", type=int, default=8, help="DPM-Solver++ steps of each redraw (default 8)")
    p.add_argument("--self-check-threshold", type=float, default=0.5,
                   help="flag records scoring below this (default 0.5)")
    p.add_argument("--self-check-guidance", type=float, help="guidance scale of the redraw (default: the model's)")
    p.add_argument("--self-check-seed", type=int, default=0)
    p.add_argument("--ray", action="store_true", help="run the model on a pool of Ray actors (pip install "
                                                      "'vlv-engine[ray]'); the manifest and outputs stay here")
    p.add_argument("--ray-address", help="'auto' (a running cluster), 'local' (start one here) or an address "
                                         "(default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--ray-actors", type=int, help="engine actors (default: one per GPU, else one per CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, failures or summary on stderr")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("reconstruct", help="regenerate images from their caption embeddings")
    p.add_argument("inputs", nargs="+")
    model_args(p)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, default=0)
    sampler_arg(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("eval", help="evaluate a model on held-out Shapes World scenes")
    p.add_argument("suite", choices=["shapes"])
    model_args(p)
    p.add_argument("--num", type=int, default=500, help="held-out scenes for caption accuracy")
    p.add_argument("--recon-num", type=int, default=100, help="single-object scenes to reconstruct (0: skip)")
    p.add_argument("--seed", type=int, default=20_260_000)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    sampler_arg(p)
    p.add_argument("--num-beams", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", help="write the full report here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train stage 1 (images only) or stage 2 (captions)")
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("--config", help="YAML / TOML / JSON training config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 --set steps=500")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="convert the released official checkpoints to a model folder")
    p.add_argument("--out", required=True)
    p.add_argument("--stage2", help="stage-2 model.pt")
    p.add_argument("--stage1", help="stage-1 consolidated pytorch_model.bin")
    p.add_argument("--florence2", required=True, help="Florence-2-large folder")
    p.add_argument("--stable-diffusion", help="SD-2.1-base folder (diffusers layout)")
    p.add_argument("--llm", help="Qwen2.5-3B folder")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="HTTP captioning service with dynamic batching (needs the [serve] extra)")
    model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="images per model batch")
    p.add_argument("--max-delay-ms", type=float, default=10.0, help="how long a lone image waits for company")
    p.add_argument("--max-queue", type=int, default=256, help="images waiting; beyond it requests get 503")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 beyond)")
    p.add_argument("--max-images", type=int, default=16, help="images per request (413 beyond)")
    p.add_argument("--max-pixels", type=int, default=64 * 2**20,
                   help="refuse larger images from their header (413; 0: Pillow's limit only)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout (504 beyond)")
    p.add_argument("--threads", type=int, help="torch threads of the model (default on a CPU: cores - 1, "
                                               "leaving one for HTTP and decoding; OMP_NUM_THREADS wins)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("bench", help="benchmark the caption fast path against the reference pipeline")
    p.add_argument("--preset", default="nano", choices=["nano", "small", "paper"],
                   help="nano: the bundled model; small / paper: random weights at those dimensions (paper: GPU)")
    p.add_argument("--suites", nargs="+", default=["encoder", "decode", "e2e"],
                   choices=["encoder", "decode", "e2e", "memory", "unet", "preprocess"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--e2e-batch-sizes", nargs="+", type=int, help="batch sizes of the e2e suite (default: "
                                                                    "--batch-sizes)")
    p.add_argument("--out", help="folder for bench_PRESET.json and bench_PRESET.png")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast-dtype", choices=["float32", "bfloat16", "float16"],
                   help="the fast path's dtype (default: float32 on a CPU, bfloat16 on CUDA)")
    p.add_argument("--quantize", help="the fast path's LLM quantization scheme (vlv_engine.engine.quantize)")
    p.add_argument("--encoder-quantize", choices=ENCODER_QUANT_NAMES,
                   help="the fast path's encoder quantization (vlv_engine.engine.encoder_quant)")
    p.add_argument("--decode-schemes", nargs="*", default=[],
                   help="more decode-suite rows: 'none' (unquantized, fast dtype), scheme names, or "
                        "'inductor_graphs' (CUDA: the fast LLM under inductor's CUDA graphs, not captured steps)")
    p.add_argument("--no-compile", action="store_true", help="eager decode step (no torch.compile)")
    p.add_argument("--encoder-backend", default="auto", choices=ENCODER_BACKEND_NAMES,
                   help="the fast path's encoder backend")
    p.add_argument("--encoder-batch-size", type=int,
                   help="the fast engine's images per encoder forward (default: the engine's, two 768 px images; "
                        "the memory suite always runs the default)")
    p.add_argument("--unet-backend", default="auto", choices=["auto", "onnx", "tensorrt", "compile"],
                   help="the unet suite's fast backend (default: auto: tensorrt, else compile, on CUDA; onnx on a CPU)")
    p.add_argument("--new-tokens", type=int, help="fixed caption length (EOS suppressed in both pipelines)")
    p.add_argument("--num-beams", type=int, help="beams of the e2e suite (default: the preset's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency-repeats", type=int, help="e2e batch-1 repeats for p50/p95 (default: --repeats)")
    p.add_argument("--memory-batch", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--time-limit", type=float, help="seconds; suites not started by then are skipped")
    p.set_defaults(func=cmd_bench)
    return parser


def _quiet_libraries() -> None:
    # Weight-loading progress bars and notices from the libraries would drown the
    # JSONL on the terminal; the command line owns its process, so it may set this.
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    # transformers imports torchao when it is installed (the `quant` extra), and torchao
    # then warns on every run: its CUDA-only libraries do not load on a CPU, and it
    # registers enums in a way this torch deprecates (torch.utils._pytree).
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


# PyTorch's CPU allocator returns every large tensor to the OS when it is freed, so the
# next one page-faults its memory in again, 4 KB at a time: in the eager encoder at 768 px
# that was ~13 % of the time (a fresh 600 MB GELU output costs 4x an in-place one).
# Transparent huge pages (c10's THP_MEM_ALLOC_ENABLE, for allocations of 2 MB and more)
# fault 2 MB at once. The `vlv` process sets it unless the environment already says;
# `import vlv_engine` leaves the process alone.
CPU_ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in CPU_ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)  # before the first large tensor: c10 reads it once
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
