"""Encoder-to-bottleneck speed: eager vs torch.compile (vs the Triton path on CUDA).

    python benchmarks/encoder_path.py [--preset small] [--batches 1 8] [--backends eager compile]
                                      [--batching buckets] [--repeats 2] [--device cpu] [--dtype float32]
    python benchmarks/encoder_path.py --preset paper --device cuda --dtype bfloat16 --batches 1 64 \
                                      [--graph-scope full]     # the H100 targets: <= 5 ms, >= 300 images/s

Times `Engine.encode_pixels` (normalized pixels [B, 3, S, S] -> caption embedding
[B, Nq, D]: Florence-2, the queries, phi, the CLIP text encoder) per backend, on a
model with random weights at the preset's dimensions (`small`: Florence-2-base at
768 px, CLIP-L text; `paper`: Florence-2-large, OpenCLIP-H text; GPU only). All
backends run in one process on one model, so the ratios compare like with like:
  * first call: what the first encode costs (a compile, the CUDA graph captures);
  * ms / batch: the best of --repeats timed calls after it (the backends take turns,
    so a change in the machine's load hits all of them); images/s from that;
  * x eager: eager's ms / this backend's ms at the same batch;
  * rel err: max |out - eager| / max |eager|;
  * peak memory, read after the backend's first call: the process's peak RSS so far on a
    CPU (a high-water mark: it only grows), max allocated during that call on CUDA.
The machine and its load average are printed: on a shared machine the load moves every
number, so compare the backends of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

from vlv_engine.bench.machine import cpu_name


def _model(preset_name: str):
    import torch

    from vlv_engine.config import preset
    from vlv_engine.models import VLVModel

    cfg = preset(preset_name)
    if not cfg.encoder.prompt_ids:  # random weights: any ids of the real prompt's length will do
        cfg.encoder.prompt_ids = [0] + list(range(10, 21)) + [2]
    torch.manual_seed(0)
    return VLVModel.from_config(cfg, with_caption_decoder=False, with_diffusion=False).eval()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "nano", "small", "paper"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--backends", nargs="+", default=None, choices=["eager", "compile", "triton"],
                        help="default: eager compile on a CPU, eager compile triton on CUDA")
    parser.add_argument("--batching", default="buckets", choices=["buckets", "dynamic"],
                        help="how the compiled path handles batch sizes (see vlv_engine.engine.encoder_path)")
    parser.add_argument("--graph-scope", default="segment", choices=["segment", "full"],
                        help="what one CUDA graph of the triton path holds (see vlv_engine.engine.encoder_path)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    import torch

    from vlv_engine.engine.encoder_path import build_encoder_path
    from vlv_engine.engine.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = args.backends or (["eager", "compile"] + (["triton"] if device.type == "cuda" else []))
    if "eager" not in backends:
        backends = ["eager", *backends]  # the reference of every ratio
    load_before = os.getloadavg()[0]
    model = _model(args.preset)
    size = model.config.encoder.image_size
    max_batch = max(args.batches)
    gen = torch.Generator().manual_seed(0)
    pixels = {b: torch.randn(b, 3, size, size, generator=gen).to(device, dtype) for b in args.batches}

    engines = {}
    for name in backends:
        engines[name] = Engine(model, device=device, dtype=dtype, batch_size=max_batch, encoder_backend=name)
        if name == "compile":  # the engine's runner, with the batching asked for
            engines[name]._encoder_path = build_encoder_path("compile", model, max_batch=max_batch,
                                                             batching=args.batching)
        if name == "triton":
            engines[name]._encoder_path = build_encoder_path("triton", model, max_batch=max_batch,
                                                             graph_scope=args.graph_scope)

    def run(name: str, b: int) -> tuple[float, torch.Tensor]:
        _sync(device)
        t = time.perf_counter()
        out = engines[name].encode_pixels(pixels[b])
        _sync(device)
        return time.perf_counter() - t, out

    rows = []
    for b in args.batches:
        first, peak, outs = {}, {}, {}
        for name in backends:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first[name], outs[name] = run(name, b)
            peak[name] = _peak_mb(device)
            print(f"  {name} batch {b}: first call {first[name]:.1f} s", flush=True)
        best = {name: float("inf") for name in backends}
        for _ in range(args.repeats):  # interleaved: a change in the machine's load hits every backend
            for name in backends:
                best[name] = min(best[name], run(name, b)[0])
        ref = outs["eager"].float()
        for name in backends:
            err = ((outs[name].float() - ref).abs().max() / ref.abs().max()).item()
            rows.append((name, b, first[name], best[name] * 1000, best["eager"] / best[name], err, peak[name]))

    print(f"machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
          + f"; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"preset {args.preset} ({size} px, Nq {model.config.encoder.num_queries}), {args.dtype}, random weights; "
          f"compile batching: {args.batching}; triton graph scope: {args.graph_scope}; best of {args.repeats}")
    mem = "peak alloc MB" if device.type == "cuda" else "peak RSS MB (so far)"
    print(f"| backend | batch | first call s | ms / batch | images/s | x eager | rel err | {mem} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, b, first, ms, ratio, err, peak in rows:
        print(f"| {name} | {b} | {first:.1f} | {ms:.1f} | {b * 1000 / ms:.2f} | {ratio:.2f} | {err:.1e} | "
              f"{peak:.0f} |")


if __name__ == "__main__":
    main()
