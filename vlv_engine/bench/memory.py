"""Memory suite: peak memory of captioning with one pipeline alone in its process.

The other suites hold both pipelines in one process, so their RSS counts both models.
Here each pipeline is built and run in a fresh subprocess (`python -m
vlv_engine.bench.memory`): peak RSS (sampled) and, on CUDA, max allocated, while it
captions a batch at the fixed caption length, with the RSS after loading beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch

from vlv_engine.bench.report import Row


def probe(args: argparse.Namespace) -> dict:
    from vlv_engine.bench.measure import PeakMemory, current_rss
    from vlv_engine.bench.pipelines import (PRESET_DEFAULTS, caption_tokens, eager_attention, has_encoder_backends,
                                            load_model, random_pixels)
    from vlv_engine.engine.decode import make_decoder
    from vlv_engine.engine.engine import Engine

    device = torch.device(args.device)
    model, _ = load_model(args.preset, device=device)
    if args.pipeline == "reference":
        eager_attention(model)
        kwargs = {"dtype": torch.float32, "decoder": "reference"}
        if has_encoder_backends():
            kwargs["encoder_backend"] = "eager"
    else:
        kwargs = {"dtype": getattr(torch, args.dtype), "decoder": "compiled" if args.compile else "static",
                  "quantize": args.quantize}
        if args.encoder_quantize:
            kwargs["encoder_quantize"] = args.encoder_quantize
        if has_encoder_backends():
            kwargs["encoder_backend"] = args.encoder_backend
    engine = Engine(model, device=device, **kwargs)
    del model
    gc.collect()
    loaded_rss = current_rss()
    tokens, beams = PRESET_DEFAULTS[args.preset]
    gen = engine.generation_config(max_new_tokens=args.new_tokens or tokens, num_beams=args.num_beams or beams)
    llm = engine.model.caption_decoder.llm
    decoder = make_decoder(engine.decoder, llm)
    eos = llm.config.get_text_config(decoder=True).vocab_size
    pixels = random_pixels(engine, args.batch)
    with PeakMemory(device) as mem:
        caption_tokens(engine, decoder, pixels, gen, eos)
    return {"loaded_rss": loaded_rss, "peak_rss": mem.peak_rss, "peak_cuda": mem.peak_cuda,
            "peak_cuda_reserved": mem.peak_cuda_reserved}


def run_memory(*, preset: str, device: torch.device, batch: int, dtype: torch.dtype, quantize: str | None,
               encoder_quantize: str | None = None,
               compile: bool, new_tokens: int, num_beams: int, encoder_backend: str = "auto",
               timeout: float = 1800) -> list[Row]:
    results = {}
    for pipeline in ("fast", "reference"):
        cmd = [sys.executable, "-m", "vlv_engine.bench.memory", "--pipeline", pipeline, "--preset", preset,
               "--device", str(device), "--batch", str(batch), "--dtype", str(dtype).replace("torch.", ""),
               "--new-tokens", str(new_tokens), "--num-beams", str(num_beams), "--encoder-backend", encoder_backend]
        cmd += (["--quantize", quantize] if quantize else []) + (["--compile"] if compile else [])
        if encoder_quantize and pipeline == "fast":
            cmd += ["--encoder-quantize", encoder_quantize]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe ({pipeline}) failed: {done.stderr.strip()[-2000:]}")
        results[pipeline] = json.loads(done.stdout.strip().splitlines()[-1])
    f, r = results["fast"], results["reference"]
    extra = {"beams": num_beams, "tokens": new_tokens, "loaded_GB": round(f["loaded_rss"] / 2**30, 2),
             "ref_loaded_GB": round(r["loaded_rss"] / 2**30, 2)}
    rows = [Row("memory", "peak RSS captioning", "GB", batch, f["peak_rss"] / 2**30, r["peak_rss"] / 2**30,
                "lower", extra)]
    if device.type == "cuda":
        rows.append(Row("memory", "max allocated captioning", "GB", batch, f["peak_cuda"] / 2**30,
                        r["peak_cuda"] / 2**30, "lower",
                        # What the allocator holds (graph pools, cached blocks): what a smaller GPU must fit.
                        {"max_reserved_GB": round(f["peak_cuda_reserved"] / 2**30, 2),
                         "ref_max_reserved_GB": round(r["peak_cuda_reserved"] / 2**30, 2)}))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description="peak memory of one captioning pipeline (vlv bench's memory suite)")
    p.add_argument("--pipeline", choices=["fast", "reference"], required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize")
    p.add_argument("--encoder-quantize")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--encoder-backend", default="auto")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--num-beams", type=int)
    args = p.parse_args()
    print(json.dumps(probe(args)))


if __name__ == "__main__":
    main()
