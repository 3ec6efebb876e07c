"""Decode suite: ms per new token and tokens/s of the LLM decode loop, greedy, against
HF `generate` in fp32, with the % of the memory-bandwidth bound.

A step's time is (t(n2 tokens) - t(n1 tokens)) / (n2 - n1) for one call decoding a
fixed number of tokens (EOS never emitted), so the prefill and per-call setup cancel.
The bound: a step reads every weight once (`decode_weight_bytes`), so it cannot take less
than weight bytes / the bandwidth of a large copy measured on the same machine.

Agreement with the reference, per row:
* `token_match`: the free-running tokens, position by position. Once a path picks one other
  token it goes on from another text, so after the first difference this counts the
  divergence, not the agreement. Random weights make it fall fast: their next-token logits
  are nearly flat (the top two a few hundredths apart on the small preset), so any
  quantization noise flips a token early.
* `tf_top1` and `logit_sqnr_db`: both LLMs fed the reference's own tokens, one token per
  step from a static cache as the decode loop runs them; the share of positions where the
  two choose the same next token, and the SQNR of the path's logits against the
  reference's. These measure each step's error apart from what came before it.
"""

from __future__ import annotations

import copy

import torch

from vlv_engine.bench.measure import time_calls
from vlv_engine.bench.pipelines import BenchSetup, token_match
from vlv_engine.bench.report import Row
from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import (StaticDecoder, allocate_cache, decode_step, decode_threads, prefill,
                                      prepare_llm)
from vlv_engine.engine.quantize import decode_weight_bytes, quantize_llm


INDUCTOR_GRAPHS = "inductor_graphs"  # a decode row, not a scheme: the fast LLM under inductor's CUDA graphs


def variant_llm(setup: BenchSetup, dtype: torch.dtype):
    """A copy of the reference's LLM (its fp32 weights) set up as the fast path's is: the
    fast path's attention (the reference runs "eager"), fused projections, in `dtype`."""
    llm = copy.deepcopy(setup.reference.model.caption_decoder.llm).to(dtype=dtype)
    llm.set_attn_implementation(setup.fast_decoder.llm.config._attn_implementation)
    return prepare_llm(llm)


def variant_decoders(setup: BenchSetup, schemes: list[str], dtype: torch.dtype, compile: bool) -> dict:
    """label -> decoder: the fast path's own, plus one per extra scheme ("none": unquantized
    in `dtype`), each a copy of the reference LLM (measured at the smallest batch only).
    "inductor_graphs" (compiled, CUDA): the fast path's LLM with inductor's own CUDA graphs
    instead of the decoder's captured token steps, an A/B of the two."""
    out = {f"fast ({setup.notes['quantize']}, {setup.notes['fast_dtype']})": setup.fast_decoder}
    for scheme in schemes:
        if scheme == setup.notes["quantize"]:
            continue
        if scheme == INDUCTOR_GRAPHS:
            if not (compile and setup.device.type == "cuda"):
                raise ValueError(f"the {INDUCTOR_GRAPHS!r} decode row needs a compiled decoder on CUDA")
            out[f"fast, inductor CUDA graphs ({setup.notes['quantize']})"] = StaticDecoder(
                setup.fast_decoder.llm, compile=True, cuda_graphs=False)
            continue
        llm = variant_llm(setup, dtype)
        if scheme != "none":
            quantize_llm(llm, scheme, device=setup.device)
        out[f"{scheme} ({str(llm.dtype).replace('torch.', '')})"] = StaticDecoder(
            llm, compile=compile)
    return out


def _step_seconds(decoder, prefix: torch.Tensor, n1: int, n2: int, eos: int, repeats: int,
                  device: torch.device) -> tuple[float, torch.Tensor]:
    outs = {}

    def run(n: int):
        gen = GenerationConfig(max_new_tokens=n, num_beams=1)

        def call():
            outs[n] = decoder.generate(prefix, gen, eos_token_id=eos, pad_token_id=0)
        return time_calls(call, repeats=repeats, warmup=0, device=device).best

    run(n1)  # warm-up: compiles, cache allocation
    t2, t1 = run(n2), run(n1)
    assert outs[n2].shape[1] == n2, "EOS was emitted: the caption length is not fixed"
    return max(t2 - t1, 1e-9) / (n2 - n1), outs[n2]


def _gpu_work_per_step(decoder, prefix: torch.Tensor, n1: int, n2: int, eos: int) -> tuple[float | None, float]:
    """(GPU kernel ms, GPU operations) per step (CUDA), from the profiler: an n2-token call
    minus an n1-token one, over n2 - n1. Beside the measured step time the kernel time says
    whether a step waits on the GPU (kernel time ~ step time) or on the host (well below
    it); the operation count (kernels, copies, fills) is what each step launches, a few
    microseconds each even inside a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    totals, counts = [], []
    for n in (n1, n2):
        gen = GenerationConfig(max_new_tokens=n, num_beams=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder.generate(prefix, gen, eos_token_id=eos, pad_token_id=0)
            torch.cuda.synchronize()
        on_gpu = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        totals.append(sum(e.self_device_time_total for e in on_gpu) / 1e3)  # ms
        counts.append(sum(e.count for e in on_gpu))
    per_step = (totals[1] - totals[0]) / (n2 - n1)
    return (round(per_step, 3) if per_step > 0 else None), round((counts[1] - counts[0]) / (n2 - n1), 1)


AGREEMENT_ROWS = 4  # rows of the smallest batch whose teacher-forced agreement is measured


@torch.no_grad()
def teacher_forced_logits(llm, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, V] fp32: the next-token logits `llm` gives at each of the T positions of `ids`
    [B, T], fed the [B, Nq, H] prefix and then ids[:, :t], one token per step from a static
    cache (as the decode loop runs: a path whose activations are quantized per tensor sees
    one row per step here too, not a whole sequence). Greedy ids are the argmax of their
    own model's logits here."""
    n, nq, _ = prefix.shape
    cache = allocate_cache(llm, n, nq + ids.shape[1])
    ids = ids.to(llm.device)
    out = [prefill(llm, cache, prefix.to(device=llm.device, dtype=llm.dtype))]
    for t in range(ids.shape[1] - 1):
        position = torch.tensor([nq + t], device=llm.device)
        out.append(decode_step(llm, cache, ids[:, t:t + 1], position))
    return torch.stack(out, dim=1)


def logit_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> dict:
    """tf_top1: share of positions with the same argmax; logit_sqnr_db: SQNR of `logits`
    against `ref_logits` (both [B, T, V])."""
    logits, ref_logits = logits.double().cpu(), ref_logits.double().cpu()
    noise = (ref_logits - logits).norm()
    sqnr = float("inf") if noise == 0 else float(20 * torch.log10(ref_logits.norm() / noise))
    return {"tf_top1": round(float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean()), 3),
            "logit_sqnr_db": round(sqnr, 1)}


def run_decode(setup: BenchSetup, batches: list[int], *, repeats: int, bandwidth: float,
               schemes: list[str] | None = None, dtype: torch.dtype | None = None, compile: bool = True,
               on_row=lambda row: None) -> list[Row]:
    ref_llm = setup.reference.model.caption_decoder.llm
    hidden = ref_llm.config.get_text_config(decoder=True).hidden_size
    nq = setup.reference.config.encoder.num_queries
    n1 = 2
    n2 = n1 + min(setup.new_tokens, 32)
    decoders = variant_decoders(setup, schemes or [], dtype or ref_llm.dtype, compile)
    ref_bytes = decode_weight_bytes(ref_llm)
    rows: list[Row] = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prefix = (torch.randn(batch, nq, hidden, generator=g) * 3).to(setup.device)  # [B, Nq, H]
        ref_s, ref_ids = _step_seconds(setup.reference_decoder, prefix, n1, n2, setup.never_eos,
                                       repeats, setup.device)
        ref_logits = None
        for label, decoder in decoders.items():
            if decoder is not setup.fast_decoder and batch != batches[0]:
                continue  # extra schemes at the smallest batch only (each bucket compiles)
            fast_s, ids = _step_seconds(decoder, prefix.to(decoder.llm.dtype), n1, n2, setup.never_eos,
                                        repeats, setup.device)
            weight_bytes = decode_weight_bytes(decoder.llm)
            bound_s = weight_bytes / bandwidth
            extra = {"path": label, "weights_MB": round(weight_bytes / 1e6, 1),
                     "bw_bound_pct": round(100 * bound_s / fast_s, 1),
                     "ref_bw_bound_pct": round(100 * (ref_bytes / bandwidth) / ref_s, 1),
                     "token_match": round(token_match(ids, ref_ids), 3)}
            if batch == batches[0]:
                agree_prefix, agree_ids = prefix[:AGREEMENT_ROWS], ref_ids[:AGREEMENT_ROWS]
                if ref_logits is None:
                    ref_logits = teacher_forced_logits(ref_llm, agree_prefix, agree_ids)
                with decode_threads(decoder.llm):
                    extra.update(logit_agreement(teacher_forced_logits(decoder.llm, agree_prefix, agree_ids),
                                                 ref_logits))
            if getattr(decoder, "capture", False):  # the decoder's own CUDA graphs: did they capture?
                failures = list(decoder.capture_failures.values())
                extra["cuda_graph"] = f"capture failed: {failures[0]}" if failures else "captured"
            if setup.device.type == "cuda":
                try:
                    extra["gpu_kernel_ms"], extra["gpu_ops"] = _gpu_work_per_step(
                        decoder, prefix.to(decoder.llm.dtype), n1, n2, setup.never_eos)
                except Exception as err:  # a diagnostic only: the profiler may not see into CUDA graphs
                    extra["gpu_kernel_ms"] = f"unavailable ({type(err).__name__})"
            rows.append(Row("decode", "ms/token", "ms", batch, fast_s * 1e3, ref_s * 1e3, "lower", extra))
            on_row(rows[-1])
            rows.append(Row("decode", "tokens/s", "tok/s", batch, batch / fast_s, batch / ref_s, "higher",
                            {"path": label}))
    return rows
