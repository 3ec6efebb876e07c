"""The caption path's GPU memory, sized on the CPU (the meta device: shapes only).

    python -m vlv_engine.bench.memory_estimate --preset paper --batch 8 [--quantize int4_weight_only]

What it adds up, for the engine's defaults (the caption path only: no diffusion parts):
* weights: the encoder, bottleneck and LLM parameters in the fast dtype (bf16), but for
  the two vocabulary tables the path never reads, which the engine keeps on the host
  (`engine.unread_tables`); with
  `int4_weight_only`, the LLM's linear layers as torchao's tinygemm layout stores them
  (4 bits per weight, the input width padded to a multiple of 1,024, a bf16 scale and
  zero per group of 128) and the untied input embedding in bf16;
* the encoder's peak activations for one forward of `Engine.encoder_batch_size` images,
  counted by `testing.memory_probe` with the engine's in-place GELU and fused attention;
* the static KV caches the decoder keeps: (batch bucket x beams) rows of
  round_up(queries + new tokens, 64) positions, plus beam search's one-row-per-image
  prefill cache;
* the prefill's peak activations (counted the same way).

A GPU adds what this does not see: the CUDA context (~0.5 GB, outside PyTorch's count),
cuBLAS workspaces, the allocator's rounding, and the decode step's CUDA-graph pool (a few
tens of MB). The figure to hold against a target is `torch.cuda.max_memory_allocated`
on the GPU (`vlv bench --suites memory`); this one says where the bytes go, and gates
changes that would move them before a GPU is at hand. Sizes are in GiB (2**30 bytes), as
the bench's memory rows.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

import torch
from torch import nn

from vlv_engine.engine.decode import DEFAULT_LENGTH_MULTIPLE, bucket_batch, prefill, prepare_llm, round_up
from vlv_engine.engine.engine import ENCODER_PIXELS
from vlv_engine.engine.inplace_activations import inplace_mlp_activations
from vlv_engine.engine.unread_tables import unread_tables
from vlv_engine.testing.memory_probe import peak_bytes

INT4_GROUP = 128
INT4_IN_MULTIPLE = 1024  # torchao's tile-packed layout pads a layer's input width to this
INT4_OUT_MULTIPLE = 8


def int4_linear_bytes(linear: nn.Linear) -> int:
    """Bytes of one linear layer in torchao's int4 tile-packed layout (bias in bf16)."""
    n = round_up(linear.out_features, INT4_OUT_MULTIPLE)
    k = round_up(linear.in_features, INT4_IN_MULTIPLE)
    bias = 0 if linear.bias is None else linear.out_features * 2
    return n * k // 2 + (k // INT4_GROUP) * n * 2 * 2 + bias


def _param_bytes(module: nn.Module, dtype: torch.dtype, skip: Iterable[int] = ()) -> int:
    seen, total = set(skip), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * dtype.itemsize
    return total


def llm_weight_bytes(llm: nn.Module, dtype: torch.dtype, quantize: str | None) -> int:
    if quantize is None:
        return _param_bytes(llm, dtype)
    if quantize != "int4_weight_only":
        raise ValueError(f"the estimate knows the layout of int4_weight_only only, not {quantize!r}")
    linears = [m for m in llm.modules() if isinstance(m, nn.Linear)]
    in_linears = {id(p) for m in linears for p in m.parameters()}
    rest = sum(p.numel() * dtype.itemsize for p in llm.parameters() if id(p) not in in_linears)
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    # A tied lm_head is untied by quantization: the float embedding stays beside it.
    return sum(int4_linear_bytes(m) for m in linears) + rest + (
        llm.get_input_embeddings().weight.numel() * dtype.itemsize if tied else 0)


def estimate(preset: str = "paper", *, batch: int = 8, beams: int | None = None, new_tokens: int | None = None,
             dtype: torch.dtype = torch.bfloat16, quantize: str | None = None,
             encoder_batch_size: int | None = None) -> dict:
    from transformers import StaticCache

    from vlv_engine.bench.pipelines import PRESET_DEFAULTS
    from vlv_engine.config import preset as preset_config
    from vlv_engine.models import VLVModel

    config = preset_config(preset)
    if not config.encoder.prompt_ids:  # as the bench's random presets: the task prompt's length
        config.encoder.prompt_ids = [0, *range(1000, 1010), 2]
    tokens, default_beams = PRESET_DEFAULTS.get(preset, (32, 4))
    beams, new_tokens = beams or default_beams, new_tokens or tokens
    with torch.device("meta"):
        model = VLVModel.from_config(config, with_diffusion=False).to(dtype).eval().requires_grad_(False)
    llm = prepare_llm(model.caption_decoder.llm)
    inplace_mlp_activations(model.encoder)
    model.encoder.freeze_prompt()
    size, nq = config.encoder.image_size, config.encoder.num_queries
    chunk = min(batch, encoder_batch_size or max(1, ENCODER_PIXELS // (size * size)))

    weights = [*model.parameters(), *model.buffers()]
    pixels = torch.empty(chunk, 3, size, size, device="meta", dtype=dtype)
    encoder_peak = peak_bytes(model.caption_embedding, pixels, ignore=weights)

    rows = bucket_batch(batch)
    length = round_up(nq + new_tokens, DEFAULT_LENGTH_MULTIPLE)
    text = llm.config.get_text_config(decoder=True)
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_row = 2 * text.num_hidden_layers * heads * length * head_dim * dtype.itemsize
    kv = per_row * rows * beams + (per_row * rows if beams > 1 else 0)

    cache = StaticCache(config=llm.config, max_cache_len=length)
    cache.early_initialization(rows, heads, head_dim, dtype=dtype, device="meta")
    prefix = torch.empty(rows, nq, text.hidden_size, device="meta", dtype=dtype)

    cache_buffers = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    prefill_peak = peak_bytes(lambda x: prefill(llm, cache, x), prefix, ignore=[*weights, *cache_buffers])
    host = {id(p): p for table in unread_tables(model) for p in table.parameters()}  # tied tables once
    encoder_weights = sum(_param_bytes(m, dtype, host) for m in (model.encoder, model.bottleneck))
    llm_weights = llm_weight_bytes(llm, dtype, quantize)
    weights_total = encoder_weights + llm_weights
    gb = 2**30
    return {
        "preset": preset, "batch": batch, "beams": beams, "new_tokens": new_tokens, "dtype": str(dtype),
        "quantize": quantize or "none", "encoder_batch_size": chunk,
        "encoder_weights_GiB": encoder_weights / gb, "llm_weights_GiB": llm_weights / gb,
        "host_tables_GiB": sum(p.numel() for p in host.values()) * dtype.itemsize / gb,
        "encoder_activations_GiB": encoder_peak / gb, "kv_caches_GiB": kv / gb, "prefill_activations_GiB": prefill_peak / gb,
        # The first call encodes before the caches exist; later calls encode beside them.
        "peak_first_call_GiB": (weights_total + max(encoder_peak, kv + prefill_peak)) / gb,
        "peak_steady_GiB": (weights_total + kv + max(encoder_peak, prefill_peak)) / gb,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beams", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--quantize", choices=["int4_weight_only"])
    p.add_argument("--encoder-batch-size", type=int)
    args = p.parse_args(argv)
    out = estimate(args.preset, batch=args.batch, beams=args.beams, new_tokens=args.new_tokens,
                   quantize=args.quantize, encoder_batch_size=args.encoder_batch_size)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
