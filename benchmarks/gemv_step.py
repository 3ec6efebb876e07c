"""The int8 products of one decode step: the `int8_cpu` kernel vs torch's own int8 kernel.

    python benchmarks/gemv_step.py [--preset small] [--rows 1 4 8] [--repeats 12] [--layers N]

One decode step of the preset's LLM (fused q/k/v and gate/up, as `prepare_llm` runs it)
makes, per layer, the q/k/v, output, gate/up and down products, then the lm_head: every
int8 weight is read once. This times exactly those products, each layer with its own
random weights (so they stream from memory as in a real step, not from cache), for
  * ``vlv``:   `vlv::int8_weight_linear` (kernels/gemv, the op the compiled step calls),
  * ``torch``: `torch._weight_int8pack_mm` (PyTorch's CPU int8 weight-only kernel, what
               torchao's int8 weight-only layers call on a CPU),
interleaved step by step in one process; ``vlv`` inside `kernel_threads()` as a decode
step runs it, ``torch`` on torch's threads. Per product group: median ms per step; per
path: median and best step, GB/s of weights and % of the bandwidth bound (weight bytes /
a large copy's bandwidth, measured here). Rows beyond 2 (beams, a batch) are compute-bound: read ms, not % of bound.
The machine and load average are printed: compare the paths of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time

import torch

from vlv_engine.bench.machine import cpu_name, memory_bandwidth
from vlv_engine.config import preset
from vlv_engine.native import gemv


def step_shapes(name: str, layers: int | None) -> tuple[int, dict[str, tuple[int, int]]]:
    """(layers, {product: (out, in)}) of one decode step of the preset's LLM."""
    cfg = preset(name).caption_decoder.llm
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * head_dim
    shapes = {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * cfg["intermediate_size"], h),
              "down": (h, cfg["intermediate_size"])}
    return layers or cfg["num_hidden_layers"], shapes | {"lm_head": (cfg["vocab_size"], h)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (less memory)")
    args = ap.parse_args()
    if not gemv.available():
        raise SystemExit(f"the int8_cpu kernel is not available: {gemv.unavailable_reason()}")

    n_layers, shapes = step_shapes(args.preset, args.layers)
    g = torch.Generator().manual_seed(0)

    def weights(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g), torch.rand(out, generator=g) + 0.5

    step = [(name, *weights(*shapes[name])) for _ in range(n_layers) for name in ("qkv", "o", "gate_up", "down")]
    step.append(("lm_head", *weights(*shapes["lm_head"])))
    weight_bytes = sum(w.numel() + 4 * s.numel() for _, w, s in step)
    bandwidth = memory_bandwidth("cpu")
    paths = {"vlv": lambda x, w, s: gemv.int8_weight_linear(x, w, s, None),
             "torch": lambda x, w, s: torch._weight_int8pack_mm(x, w, s)}

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"preset {args.preset}: {n_layers} layers + lm_head, {weight_bytes / 1e6:.1f} MB of int8 weights "
          f"and scales per step; bound {weight_bytes / bandwidth * 1e3:.3f} ms")
    print("| rows | path | step ms (median) | best | GB/s (best) | % of bound (best) | "
          + " | ".join(f"{k} ms" for k in shapes) + " |")
    print("| --- " * (6 + len(shapes)) + "|")
    for rows in args.rows:
        xs = {inp: torch.randn(rows, inp, generator=g) for _, inp in shapes.values()}
        per_step: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
        for rep in range(args.repeats + 1):
            for path, fn in paths.items():
                time.sleep(0.1)  # neither path starts while the other's threads may still spin
                times = dict.fromkeys(shapes, 0.0)
                with gemv.kernel_threads() if path == "vlv" else contextlib.nullcontext():
                    for name, w, s in step:
                        t = time.perf_counter()
                        fn(xs[w.shape[1]], w, s)
                        times[name] += time.perf_counter() - t
                if rep:  # the first step pages the weights and outputs in
                    per_step[path].append(times)
        for path, steps in per_step.items():
            totals = [sum(t.values()) for t in steps]
            best = min(totals)
            groups = " | ".join(f"{statistics.median(t[k] for t in steps) * 1e3:.2f}" for k in shapes)
            print(f"| {rows} | {path} | {statistics.median(totals) * 1e3:.2f} | {best * 1e3:.2f} | "
                  f"{weight_bytes / best / 1e9:.1f} | {100 * weight_bytes / bandwidth / best:.1f} | {groups} |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
