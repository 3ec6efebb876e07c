"""Our own LLM decode loop: static KV cache, one prefill, a compilable decode step.

A caption is decoded from Nq prefix embeddings (no text prompt). `StaticDecoder`
does it in the gpt-fast way, with transformers' own model forward:

1. **Cache.** One `transformers.StaticCache` per (row bucket, cache length), allocated
   on first use and kept (LRU, `max_caches`); each call resets it in place. Batches are
   padded up to a bucket (1, 2, 4, ..., 64 rows; beam search uses bucket * num_beams
   rows), the padding rows' results are dropped, and the cache length is
   Nq + max_new_tokens rounded up to `length_multiple`, so a steady workload reuses a
   few buffers and a compiled step sees a few static shapes.
2. **Prefill.** The [B, Nq, H] prefix in one forward (`inputs_embeds`, positions
   0..Nq-1, `logits_to_keep=1`), eager (it runs once per call). Beam search prefills each
   image once and copies its keys/values to its K beam rows (HF prefills K copies).
3. **Decode step.** `decode_step(llm, cache, input_ids [R, 1], cache_position [1]) ->
   logits [R, V]` (fp32): fixed shapes, the position is a tensor, the cache is written in
   place, so `torch.compile(fullgraph=True, dynamic=False)` compiles it once per cache.
4. **Search.** Greedy (finished rows are fed the pad token and their outputs masked;
   stop when every real row has finished or at max_new_tokens) or batched beam search
   (`vlv_engine.engine.beam`, a port of HF's), whose beam reordering copies
   `index_select`ed rows back into the same static buffers (addresses never change, as
   CUDA graphs need).

Output convention (that of `generation.generate_reference`): [B, T] new tokens only,
T the longest caption of the batch (EOS included), positions after a row's EOS hold
`pad_token_id` (EOS when there is no pad id). HF's beam search fills them with EOS
when the pad id is 0 (`pad_token_id or eos_token_id` on a tensor); we do not.

Why transformers' `StaticCache` and not a cache of our own: it works with the model's
own forward for any `AutoModelForCausalLM` that supports static caches (Qwen2 first),
so the prefill and every step run the exact modules the reference runs. We only
(a) set each layer's write position from `cache_position` inside the step, so the step
is a pure function of (cache, tokens, position), and (b) reorder beams in place.

Exactness: in fp32 on the tiny models the tokens equal `generate_reference` (tests in
`tests/decode/`). The static path attends over the whole masked cache where HF's
dynamic cache attends over the filled part, so logits may differ in the last bits; a
near-tie could then pick another token (more likely in bf16). `Engine(decoder=
"reference")` keeps HF `generate`.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Protocol

import torch
from transformers import PreTrainedModel, StaticCache

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.beam import beam_search
from vlv_engine.engine.generation import generate_reference
from vlv_engine.engine.quantize import EAGER_ONLY_SCHEMES, NATIVE_SCHEMES

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_LENGTH_MULTIPLE = 64
DECODERS = ("reference", "static", "compiled")


class CaptionLLMDecoder(Protocol):
    def generate(self, prefix: torch.Tensor, gen: GenerationConfig, *, eos_token_id: int | None,
                 pad_token_id: int | None) -> torch.Tensor: ...


def bucket_batch(n: int, buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS) -> int:
    """The smallest bucket holding n rows (n <= max(buckets))."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {max(buckets)}")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------- model calls


def prefill(llm: PreTrainedModel, cache: StaticCache, prefix: torch.Tensor) -> torch.Tensor:
    """Run the [R, Nq, H] prefix into an empty (reset) cache; next-token logits [R, V] fp32."""
    nq = prefix.shape[1]
    position_ids = torch.arange(nq, device=prefix.device).unsqueeze(0)  # [1, Nq]
    out = llm(inputs_embeds=prefix, position_ids=position_ids, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    return out.logits[:, -1].to(torch.float32)


def decode_step(llm: PreTrainedModel, cache: StaticCache, input_ids: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
    """One token per row: input_ids [R, 1] at position cache_position [1] -> logits [R, V] fp32.

    Static shapes and in-place cache writes only: compile it with `fullgraph=True`."""
    position = cache_position.reshape(())
    for layer in cache.layers:
        # StaticLayer writes at its own `cumulative_length`; pin it to the position we feed.
        layer.cumulative_length.copy_(position)
    out = llm(input_ids=input_ids, position_ids=cache_position.view(1, 1), past_key_values=cache, use_cache=True)
    return out.logits[:, -1].to(torch.float32)


def reordered_decode_step(llm: PreTrainedModel, cache: StaticCache, input_ids: torch.Tensor,
                          cache_position: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
    """Beam search's step: move every cache row to its beam's source row (`beam_idx` [R]),
    then `decode_step`. Compiled, the reordering is inside the step's graph: on CUDA that is
    one graph replay instead of ~4 kernel launches per layer from the host each step. It
    copies whole cache rows (static shapes); positions past the filled ones are masked."""
    reorder_cache_(cache, beam_idx)
    return decode_step(llm, cache, input_ids, cache_position)


@torch.no_grad()
def prefill_beams(llm: PreTrainedModel, cache: StaticCache, scratch: StaticCache, prefix: torch.Tensor,
                  beams: int) -> torch.Tensor:
    """Prefill for beam search: the [R, Nq, H] prefix runs once per image into `scratch`
    (R rows), and its keys/values are copied to the K beam rows of `cache` (R*K rows, row
    b*K + k). Returns next-token logits [R*K, V] fp32.

    Why: every beam of an image starts from the same prefix, so HF's way (prefill the
    prefix repeated K times) computes the same rows K times. At 77 prefix tokens and 4
    beams that repeated prefill is a compute-bound product of 308 rows per image, the
    largest part of a short caption's decode time on a CPU."""
    scratch.reset()
    logits = prefill(llm, scratch, prefix)  # [R, V]
    nq = prefix.shape[1]
    for big, small in zip(cache.layers, scratch.layers):
        for dst, src in ((big.keys, small.keys), (big.values, small.values)):  # [rows, heads, L, head_dim]
            dst[:, :, :nq].copy_(src[:, :, :nq].repeat_interleave(beams, dim=0))
    return logits.repeat_interleave(beams, dim=0)


@torch.no_grad()
def reorder_cache_(cache: StaticCache, beam_idx: torch.Tensor, length: int | None = None) -> None:
    """Row i of every layer's keys/values becomes row beam_idx[i], for the first `length`
    positions (None: all of them), written back into the same buffers."""
    for layer in cache.layers:
        for buf in (layer.keys, layer.values):  # [R, heads, L, head_dim]
            used = buf if length is None else buf[:, :, :length]
            used.copy_(used.index_select(0, beam_idx.to(buf.device)))


def stop_check_interval(device: torch.device) -> int:
    """Steps between the search's "has every row finished?" checks. Each check waits for
    the GPU (a host sync), which leaves it idle while the host prepares the next step; on
    CUDA the loop checks every 8 steps and the extra steps change nothing (finished rows
    are masked), so at most 7 steps are spent past the end. A CPU has no such wait."""
    return 8 if device.type == "cuda" else 1


def greedy_search(step, first_logits: torch.Tensor, *, max_new_tokens: int, eos_token_id: int | None,
                  pad_token_id: int, num_real: int | None = None, check_every: int = 1) -> torch.Tensor:
    """Greedy decoding from the prefill logits [R, V]; `step(input_ids [R, 1], t)` feeds the
    t-th new token. Returns [num_real, T], T the longest caption (EOS included).
    check_every: steps between the stop checks (`stop_check_interval`)."""
    rows = first_logits.shape[0]
    n = rows if num_real is None else num_real
    out = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=first_logits.device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=first_logits.device)
    # The step at which each row emitted EOS (max_new_tokens: not yet), kept on the device.
    ended = torch.full((rows,), max_new_tokens, dtype=torch.long, device=first_logits.device)
    logits = first_logits
    t = -1
    for t in range(max_new_tokens):
        nxt = torch.where(unfinished, logits.argmax(dim=-1), pad_token_id)  # [R]
        out[:, t] = nxt
        if eos_token_id is not None:
            just = unfinished & (nxt == eos_token_id)
            ended.masked_fill_(just, t)
            unfinished &= ~just
        if t + 1 == max_new_tokens:
            break
        if eos_token_id is not None and (t + 1) % check_every == 0 and not bool(unfinished[:n].any()):
            break
        logits = step(nxt.unsqueeze(1), t)
    if eos_token_id is None or n == 0:
        return out[:n, : t + 1]
    # The loop may have run past the last EOS (checks every `check_every` steps): cut there.
    length = min(int(ended[:n].max()) + 1, t + 1)
    return out[:n, :length]


# --------------------------------------------------------------------------- decoders


class ReferenceDecoder:
    """HF `generate` (the oracle), behind the decoder interface."""

    def __init__(self, llm: PreTrainedModel):
        self.llm = llm

    def generate(self, prefix: torch.Tensor, gen: GenerationConfig, *, eos_token_id: int | None,
                 pad_token_id: int | None) -> torch.Tensor:
        return generate_reference(self.llm, prefix, gen, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def cuda_step_options(scheme: str | None) -> dict:
    """Inductor options of the compiled step on CUDA: "reduce-overhead" (CUDA graphs), and
    for the int8 torchao schemes the settings of torchao's own `quantize_`, which it would set
    globally (we pass `set_inductor_config=False` and set them for this compile only):
    * coordinate descent tuning, which int8 weight-only decoding needs: its batch-1 product
      is a multiply + reduction kernel, slow at inductor's default launch configuration;
    * `force_fuse_int_mm_with_mul`: int8 dynamic's int8 product and its scale become one
      kernel. It did not lift cuBLAS's row minimum on an H200 (`min_step_rows` does that)."""
    import torch._inductor.config as inductor_config

    options = {"triton.cudagraphs": True}
    # Each only where it pays: tuning adds compile time (minutes for a 36-layer step), and
    # int4 / fp8 run their products in library kernels it does not touch.
    if scheme == "int8_weight_only":
        options.update(coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True,
                       use_mixed_mm=True)
    elif scheme == "int8_dynamic":
        options.update(force_fuse_int_mm_with_mul=True)
    # Keep only what this torch's inductor knows (options are validated at compile time).
    return {k: v for k, v in options.items() if k == "triton.cudagraphs" or hasattr(inductor_config, k)}


def min_step_rows(scheme: str | None, device_type: str, compiled: bool) -> int:
    """The fewest rows a decode step may run. int8 dynamic's compiled CUDA step multiplies
    int8 activations with cuBLAS's `_int_mm`, which refuses 16 rows or fewer (its eager
    path falls back by itself): such batches run padded to the 32-row bucket (on a GPU a
    decode step reads the same weights for 1 or 32 rows)."""
    return 17 if scheme == "int8_dynamic" and device_type == "cuda" and compiled else 1


class StaticDecoder:
    """Greedy and beam-search captioning from prefix embeddings with static KV caches.

    compile: compile the decode step (`fullgraph=True`, static shapes); `compile_mode`
    defaults to "reduce-overhead" (CUDA graphs) on CUDA and inductor's default on CPU.
    Each new (rows, cache length) compiles once (tens of seconds on a CPU); dynamo's
    `recompile_limit` (8) bounds how many distinct caches one process should use.
    Not thread-safe: calls share the caches."""

    def __init__(self, llm: PreTrainedModel, *, compile: bool = False, compile_mode: str | None = None,
                 batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS,
                 length_multiple: int = DEFAULT_LENGTH_MULTIPLE, max_caches: int = 4):
        scheme = getattr(llm, "vlv_quantization", None)
        if compile and scheme in EAGER_ONLY_SCHEMES:
            raise ValueError(f"the compiled decoder cannot run an LLM quantized with {scheme!r}: its layers are "
                             "opaque to torch.compile; use the static decoder (decoder='static')")
        self.llm = llm
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.length_multiple = length_multiple
        self.max_caches = max_caches
        self._caches: OrderedDict[tuple, StaticCache] = OrderedDict()
        self._prefill_caches: OrderedDict[tuple, StaticCache] = OrderedDict()
        self.compiled = compile
        self._compile_mode = compile_mode
        self._step = None
        self._beam_step = None

    # ------------------------------------------------------------------ caches and step

    def cache(self, rows: int, max_cache_len: int) -> StaticCache:
        """The cache for (rows, length) on the model's device/dtype, allocated once, LRU-kept."""
        return self._cache(self._caches, rows, max_cache_len)

    def prefill_cache(self, rows: int, max_cache_len: int) -> StaticCache:
        """Beam search's per-image prefill cache (`prefill_beams`), kept apart so it never
        evicts a decode cache; LRU-kept with the same bound, 1/K of the decode caches' size."""
        return self._cache(self._prefill_caches, rows, max_cache_len)

    def _cache(self, store: OrderedDict, rows: int, max_cache_len: int) -> StaticCache:
        dtype, device = self.llm.dtype, self.llm.device  # the activations' (also under weight quantization)
        key = (rows, max_cache_len, dtype, device)
        cache = store.get(key)
        if cache is None:
            cache = StaticCache(config=self.llm.config, max_cache_len=max_cache_len)
            text = self.llm.config.get_text_config(decoder=True)
            heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            # Allocate now (not lazily inside a forward): fixed addresses from the start.
            cache.early_initialization(rows, heads, head_dim, dtype, device)
            store[key] = cache
            while len(store) > self.max_caches:
                store.popitem(last=False)
        store.move_to_end(key)
        return cache

    def clear(self) -> None:
        """Drop every cache (frees their memory)."""
        self._caches.clear()
        self._prefill_caches.clear()

    def _compile(self, fn):
        mode, options = self._compile_mode, None
        if mode is None and self.llm.device.type == "cuda":
            options = cuda_step_options(getattr(self.llm, "vlv_quantization", None))
        return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode, options=options)

    @property
    def step_fn(self):
        """`decode_step`, compiled on first use when `compile` is set."""
        if self._step is None:
            self._step = self._compile(decode_step) if self.compiled else decode_step
        return self._step

    @property
    def beam_step_fn(self):
        """`reordered_decode_step`, compiled on first use (compiled decoders only)."""
        if self._beam_step is None:
            self._beam_step = self._compile(reordered_decode_step)
        return self._beam_step

    def _threads(self):
        """The thread policy of the loop: with our int8 CPU kernel, the cores go to its pool
        and torch's own ops run on one thread (`gemv.kernel_threads`); otherwise torch's."""
        if getattr(self.llm, "vlv_quantization", None) in NATIVE_SCHEMES and self.llm.device.type == "cpu":
            from vlv_engine.native.gemv import kernel_threads

            return kernel_threads()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ generate

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, gen: GenerationConfig, *, eos_token_id: int | None,
                 pad_token_id: int | None) -> torch.Tensor:
        """[B, Nq, H] prefix -> [B, T] new token ids, padded with pad_token_id after EOS.

        eos_token_id=None decodes max_new_tokens for every row (HF `generate` would take the
        model's `generation_config.eos_token_id` instead); pad_token_id=None pads with EOS."""
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        prefix = prefix.to(self.llm.dtype)
        largest = self.batch_buckets[-1]
        with self._threads():
            outs = [self._generate_bucket(prefix[lo:lo + largest], gen, eos_token_id, pad)
                    for lo in range(0, prefix.shape[0], largest)]
        if not outs:
            return torch.empty((0, 0), dtype=torch.long, device=prefix.device)
        width = max(o.shape[1] for o in outs)
        outs = [torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outs]
        return torch.cat(outs)

    def _generate_bucket(self, prefix: torch.Tensor, gen: GenerationConfig, eos: int | None,
                         pad: int) -> torch.Tensor:
        n, nq, hidden = prefix.shape
        beams = gen.num_beams
        least = min_step_rows(getattr(self.llm, "vlv_quantization", None), self.llm.device.type, self.compiled)
        rows = bucket_batch(max(n, -(-least // beams)), self.batch_buckets)
        if gen.max_new_tokens < 1:
            return torch.empty((n, 0), dtype=torch.long, device=prefix.device)
        # 1. Pad to the bucket with zero rows (dropped at the end).
        x = torch.cat([prefix, prefix.new_zeros(rows - n, nq, hidden)]) if rows > n else prefix  # [rows, Nq, H]
        # 2. Prefill into the reset cache, one row per beam (row b*K + k).
        length = round_up(nq + gen.max_new_tokens, self.length_multiple)
        cache = self.cache(rows * beams, length)
        cache.reset()
        if beams == 1:
            logits = prefill(self.llm, cache, x)  # [rows, V]
        else:
            logits = prefill_beams(self.llm, cache, self.prefill_cache(rows, length), x, beams)  # [rows*K, V]
        step_fn = self.step_fn
        # The position lives on the device and is filled in place: a tensor made from a
        # host int each step would be a host-to-device copy, which waits for the GPU.
        position = torch.empty(1, dtype=torch.long, device=prefix.device)

        def step(input_ids: torch.Tensor, t: int) -> torch.Tensor:
            position.fill_(nq + t)
            # Contiguous: beam search passes a strided view, and a compiled step guards on strides.
            return step_fn(self.llm, cache, input_ids.contiguous(), position)

        # 3. Search.
        check_every = stop_check_interval(prefix.device)
        if beams == 1:
            return greedy_search(step, logits, max_new_tokens=gen.max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad, num_real=n, check_every=check_every)
        if self.compiled:  # the reordering runs inside the compiled step
            beam_step_fn, pending = self.beam_step_fn, []

            def reorder(idx: torch.Tensor, length: int) -> None:
                pending.append(idx.to(torch.long))

            def step(input_ids: torch.Tensor, t: int) -> torch.Tensor:  # noqa: F811 (the beam variant)
                position.fill_(nq + t)
                return beam_step_fn(self.llm, cache, input_ids.contiguous(), position, pending.pop())
        else:
            def reorder(idx: torch.Tensor, length: int) -> None:
                reorder_cache_(cache, idx, length)
        return beam_search(step, reorder, logits,
                           batch_size=rows, num_beams=beams, max_new_tokens=gen.max_new_tokens,
                           eos_token_id=eos, pad_token_id=pad, length_penalty=gen.length_penalty,
                           early_stopping=gen.early_stopping, prefix_len=nq, num_real=n,
                           check_every=check_every)


def make_decoder(kind: str, llm: PreTrainedModel) -> CaptionLLMDecoder:
    """"reference" (HF generate), "static" (static cache, eager step) or "compiled" (the step
    under torch.compile)."""
    if kind == "reference":
        return ReferenceDecoder(llm)
    if kind in ("static", "compiled"):
        return StaticDecoder(llm, compile=kind == "compiled")
    raise ValueError(f"unknown decoder {kind!r}; choose one of {list(DECODERS)}")
