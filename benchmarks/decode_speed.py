"""Caption decode speed: HF generate vs our static-cache loop, eager and compiled.

    python benchmarks/decode_speed.py [--models tiny small] [--batches 1 8] [--threads 1]
                                      [--small-layers 4] [--no-compile]

ms per decode step (one new token per row) for greedy decoding from a random prefix of
the model's Nq positions, of
  * ``reference``: ``generate_reference`` (HF ``generate``, dynamic cache),
  * ``static``:    ``StaticDecoder`` (static cache, eager step),
  * ``compiled``:  ``StaticDecoder(compile=True)`` (the step under torch.compile; compiled
                   once per batch bucket before timing).
A step's time is (t(N2 tokens) - t(N1 tokens)) / (N2 - N1) with EOS disabled, so the
prefill and per-call setup cancel; the best of --repeats runs is kept. Models:
  * ``tiny``:  the tiny preset's LLM (2 layers, width 32, vocab 64, Nq 8),
  * ``small``: the small preset's Qwen2 (Qwen2.5-0.5B dimensions: width 896, 14 heads,
               2 KV heads, vocab 151936, Nq 77) with --small-layers layers (and optionally
               a --small-vocab vocabulary), random weights.
GB/s is the bytes of the weights (read once per step) over the step time at batch 1.
The machine and its load average are printed: on a shared machine the load changes
everything, so compare the paths of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from vlv_engine.bench.machine import cpu_name


def _models(names, small_layers, small_vocab=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlv_engine.config import preset

    for name in names:
        cfg = preset(name if name == "tiny" else "small")
        llm_cfg = dict(cfg.caption_decoder.llm)
        if name == "small":
            llm_cfg["num_hidden_layers"] = small_layers
            llm_cfg["vocab_size"] = small_vocab or llm_cfg["vocab_size"]
        config = AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg)
        torch.manual_seed(0)
        llm = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
        label = name if name == "tiny" else f"small ({small_layers} layers, vocab {llm_cfg['vocab_size']})"
        yield label, llm, cfg.encoder.num_queries


def _step_ms(decoder, prefix, n1, n2, repeats) -> float:
    from vlv_engine.config import GenerationConfig

    never = decoder.llm.config.vocab_size

    def run(n):
        gen = GenerationConfig(max_new_tokens=n, num_beams=1)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            # EOS disabled: an id past the vocabulary (None would make HF fall back to the
            # model's generation_config EOS).
            out = decoder.generate(prefix, gen, eos_token_id=never, pad_token_id=0)
            best = min(best, time.perf_counter() - t)
            assert out.shape[1] == n
        return best

    run(n1)  # warm-up (and the compile, for a compiled step)
    return (run(n2) - run(n1)) / (n2 - n1) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--small-layers", type=int, default=4)
    parser.add_argument("--small-vocab", type=int, help="vocabulary of the small model (default: Qwen2.5's "
                        "151936, whose tied lm_head is most of the weights read per step)")
    parser.add_argument("--tokens", nargs=2, type=int, default=[8, 40], metavar=("N1", "N2"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled path")
    args = parser.parse_args()
    import torch

    from vlv_engine.engine.decode import ReferenceDecoder, StaticDecoder

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    paths = ["reference", "static"] + ([] if args.no_compile else ["compiled"])
    rows = []
    with torch.no_grad():
        for label, llm, nq in _models(args.models, args.small_layers, args.small_vocab):
            weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
            decoders = {"reference": ReferenceDecoder(llm), "static": StaticDecoder(llm),
                        "compiled": StaticDecoder(llm, compile=True)}
            for path in paths:
                ms = {}
                for batch in args.batches:
                    prefix = torch.randn(batch, nq, llm.config.hidden_size) * 3
                    ms[batch] = _step_ms(decoders[path], prefix, *args.tokens, args.repeats)
                rows.append((label, weight_bytes, path, ms))

    print(f"machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"greedy, fp32, ms per decode step = (t({args.tokens[1]}) - t({args.tokens[0]})) / "
          f"{args.tokens[1] - args.tokens[0]} new tokens, best of {args.repeats}")
    head = "| model | weights | path | " + " | ".join(f"batch {b} ms/step" for b in args.batches)
    head += " | " + " | ".join(f"batch {b} tok/s" for b in args.batches) + " | GB/s (batch 1) |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for label, weight_bytes, path, ms in rows:
        cells = [f"{ms[b]:.2f}" for b in args.batches] + [f"{b * 1000 / ms[b]:.0f}" for b in args.batches]
        gbs = f"{weight_bytes / (ms[args.batches[0]] / 1000) / 1e9:.2f}" if args.batches[0] == 1 else "-"
        print(f"| {label} | {weight_bytes / 1e6:.1f} MB | {path} | " + " | ".join(cells) + f" | {gbs} |")


if __name__ == "__main__":
    main()
