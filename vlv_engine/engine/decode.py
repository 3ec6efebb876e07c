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
   0..Nq-1, logits of the last position only), eager (it runs once per call). Beam
   search prefills each image once and copies its keys/values to its K beam rows (HF
   prefills K copies).
3. **Decode step.** `decode_step(llm, cache, input_ids [R, 1], cache_position [1]) ->
   logits [R, V]` (fp32): fixed shapes, the position is a tensor, the cache is written in
   place.
4. **Token step.** The search is a state machine on the device (`greedy.GreedyState`,
   `beam.BeamState`: fixed buffers, the token index a tensor). `greedy_token_step` /
   `beam_token_step` run one token: (beam search: move every cache row to its beam's
   source row,) the decode step, the search's update, all in place. So one token is one
   function of fixed shapes and addresses: `torch.compile(fullgraph=True, dynamic=False)`
   compiles it once per (cache, search settings), and on CUDA it is captured once into a
   CUDA graph (`cuda_graph`) and each token is one replay, with no guards and no Python
   in the loop. The host counts tokens and reads the "still running?" flag every few
   tokens (`stop_check_interval`).

The engine runs these decoders on a prepared LLM (`prepare_llm`): q/k/v and gate/up as
one product each, and one-token attention on the grouped key/value heads. A 36-layer
Qwen2 token step then launches 9 operations per layer instead of 14 (inductor's code on
our CPU: 327 per token instead of 507).

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
near-tie could then pick another token (more likely in bf16). Compiled, the search's own
arithmetic (beam search's log-softmax) is generated code too, with its own rounding.
`Engine(decoder="reference")` keeps HF `generate`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import OrderedDict
from typing import Protocol

import torch
from transformers import PreTrainedModel, StaticCache

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.beam import BeamState, beam_update
from vlv_engine.engine.cuda_graph import CapturedStep, CaptureError, graph_pool
from vlv_engine.engine.decode_attention import use_decode_attention
from vlv_engine.engine.fused_projections import fuse_projections
from vlv_engine.engine.generation import generate_reference
from vlv_engine.engine.greedy import GreedyState, greedy_update
from vlv_engine.engine.quantize import NATIVE_SCHEMES

log = logging.getLogger(__name__)

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


def prepare_llm(llm: PreTrainedModel) -> PreTrainedModel:
    """The LLM as our decoders run it, in place: q/k/v and gate/up as one product each
    (`fused_projections`) and one-token attention on the grouped key/value heads
    (`decode_attention`). Neither changes what the model computes beyond rounding, nor its
    state dict; `Engine(decoder="reference")` leaves HF's model as it is."""
    fuse_projections(llm)
    use_decode_attention(llm)
    cache_keyword(llm)
    return llm


def cache_keyword(llm: PreTrainedModel) -> str:
    """The keyword the LLM's forward takes its KV cache by, read once per model (outside
    any compiled region: `prepare_llm`, `StaticDecoder`). transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns, and goes in 5.40); 5.23, and any
    model not moved yet, know only the old one."""
    name = getattr(llm, "vlv_cache_keyword", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
        llm.vlv_cache_keyword = name
    return name


def allocate_cache(llm: PreTrainedModel, rows: int, max_cache_len: int) -> StaticCache:
    """A static KV cache of `rows` x `max_cache_len` on the LLM's device, in its activations'
    dtype, allocated now (not lazily inside a forward): fixed addresses from the start."""
    cache = StaticCache(config=llm.config, max_cache_len=max_cache_len)
    text = llm.config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache.early_initialization(rows, heads, head_dim, dtype=llm.dtype, device=llm.device)
    return cache


def prefill(llm: PreTrainedModel, cache: StaticCache, prefix: torch.Tensor) -> torch.Tensor:
    """Run the [R, Nq, H] prefix into an empty (reset) cache; next-token logits [R, V] fp32."""
    nq = prefix.shape[1]
    position_ids = torch.arange(nq, device=prefix.device).unsqueeze(0)  # [1, Nq]
    # The last position by index, not `logits_to_keep=1`: HF then slices the hidden states
    # to a [R, 1, H] view with the prefix's row stride, and a linear layer on a strided 3-D
    # input runs as a batched product over the weight expanded R times. A CPU copies that
    # expansion (R x the vocabulary table: 4.9 s and 2.2 GB at 8 rows of the small preset
    # in bf16, 165 ms against 65 in fp32). Indexing gathers a contiguous [R, 1, H].
    last = torch.tensor([nq - 1], device=prefix.device)
    out = llm(inputs_embeds=prefix, position_ids=position_ids, use_cache=True, logits_to_keep=last,
              **{cache_keyword(llm): cache})
    return out.logits[:, -1].to(torch.float32)


def decode_step(llm: PreTrainedModel, cache: StaticCache, input_ids: torch.Tensor,
                cache_position: torch.Tensor) -> torch.Tensor:
    """One token per row: input_ids [R, 1] at position cache_position [1] -> logits [R, V] fp32.

    Static shapes and in-place cache writes only: compile it with `fullgraph=True`."""
    position = cache_position.reshape(())
    for layer in cache.layers:
        # StaticLayer writes at its own `cumulative_length`; pin it to the position we feed.
        layer.cumulative_length.copy_(position)
    out = llm(input_ids=input_ids, position_ids=cache_position.view(1, 1), use_cache=True,
              **{cache_keyword(llm): cache})
    return out.logits[:, -1].to(torch.float32)


def greedy_token_step(llm: PreTrainedModel, cache: StaticCache, state: GreedyState) -> None:
    """One token of greedy search, in place: feed `state.ids` at its position, choose the next
    token. Static shapes, no host syncs: compiled and captured as one graph."""
    greedy_update(state, decode_step(llm, cache, state.ids, state.position()))


def beam_token_step(llm: PreTrainedModel, cache: StaticCache, state: BeamState, length: int | None = None) -> None:
    """One token of beam search, in place: move every cache row to its beam's source row
    (`state.beam_idx`), feed `state.ids`, advance the search. Compiled, the reordering is in
    the token's graph; eager, `length` limits it to the filled positions (a host int: the
    compiled step copies whole rows instead, positions past the filled ones are masked)."""
    reorder_cache_(cache, state.beam_idx, length)
    beam_update(state, decode_step(llm, cache, state.ids, state.position()))


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


# --------------------------------------------------------------------------- decoders


class ReferenceDecoder:
    """HF `generate` (the oracle), behind the decoder interface."""

    def __init__(self, llm: PreTrainedModel):
        self.llm = llm

    def generate(self, prefix: torch.Tensor, gen: GenerationConfig, *, eos_token_id: int | None,
                 pad_token_id: int | None) -> torch.Tensor:
        return generate_reference(self.llm, prefix, gen, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def decode_threads(llm: PreTrainedModel):
    """The thread policy of a decode loop, a context: with our int8 CPU kernel, the cores go
    to its pool and torch's own ops run on one thread (`gemv.kernel_threads`); otherwise
    torch's."""
    if getattr(llm, "vlv_quantization", None) in NATIVE_SCHEMES and llm.device.type == "cpu":
        from vlv_engine.native.gemv import kernel_threads

        return kernel_threads()
    return contextlib.nullcontext()


def cuda_step_options(scheme: str | None, *, inductor_graphs: bool = False) -> dict:
    """Inductor options of the compiled token step on CUDA.

    inductor_graphs: inductor's own CUDA graphs ("reduce-overhead"), for a decoder that
    does not capture the step itself (`StaticDecoder(cuda_graphs=False)`); by default the
    decoder captures it (`cuda_graph`) and inductor must not.

    For the int8 torchao schemes, the settings of torchao's own `quantize_`, which it would
    set globally (we pass `set_inductor_config=False` and set them for this compile only):
    * coordinate descent tuning, which int8 weight-only decoding needs: its batch-1 product
      is a multiply + reduction kernel, slow at inductor's default launch configuration.
      Inductor writes the product that way for one row only. At more rows (beams, a batch)
      torchao's int8 weight-only product converts the whole weight to bf16 and then calls
      cuBLAS, every token: ~2.5x the bytes of a bf16 step. So int8 weight-only on CUDA is
      for greedy batch-1 decoding; beam search and batches want bf16, int4 or int8 dynamic;
    * `force_fuse_int_mm_with_mul`: int8 dynamic's int8 product and its scale become one
      kernel. It did not lift cuBLAS's row minimum on an H200 (`min_step_rows` does that)."""
    import torch._inductor.config as inductor_config

    options = {"triton.cudagraphs": inductor_graphs}
    # Each only where it pays: tuning adds compile time (minutes for a 36-layer step), and
    # int4 / fp8 run their products in library kernels it does not touch.
    if scheme == "int8_weight_only":
        options.update(coordinate_descent_tuning=True, coordinate_descent_check_all_directions=True)
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

    compile: compile the token step (`fullgraph=True`, static shapes) with inductor
    (`compile_mode`, default inductor's default). Each new (rows, cache length, search
    settings) compiles once (tens of seconds on a CPU); dynamo's `recompile_limit` (8)
    bounds how many distinct ones one process should use.
    cuda_graphs: capture each compiled token step into a CUDA graph (`cuda_graph`); None:
    on CUDA when compiled. False on CUDA uses inductor's own CUDA graphs instead (the
    token step then pays dynamo's guards on every call).
    Not thread-safe: calls share the caches and search states."""

    def __init__(self, llm: PreTrainedModel, *, compile: bool = False, compile_mode: str | None = None,
                 cuda_graphs: bool | None = None, batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS,
                 length_multiple: int = DEFAULT_LENGTH_MULTIPLE, max_caches: int = 4):
        on_cuda = llm.device.type == "cuda"
        if cuda_graphs and not (compile and on_cuda):
            raise ValueError("cuda_graphs=True needs compile=True and an LLM on a CUDA device "
                             f"(compile={compile}, device={llm.device})")
        self.capture = bool(compile and on_cuda and cuda_graphs is not False)
        if self.capture and compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode={compile_mode!r} adds inductor's CUDA graphs to a step the decoder "
                             "captures itself; pass cuda_graphs=False to use inductor's instead")
        self.llm = llm
        cache_keyword(llm)  # now, not inside a compiled step
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.length_multiple = length_multiple
        self.max_caches = max_caches
        self._caches: OrderedDict[tuple, StaticCache] = OrderedDict()
        self._prefill_caches: OrderedDict[tuple, StaticCache] = OrderedDict()
        # cache key -> {search key: (state, runner)}; dropped with the cache.
        self._programs: dict[tuple, dict[tuple, tuple]] = {}
        self.compiled = compile
        self._compile_mode = compile_mode
        self._compiled_fns: dict = {}
        self._pool = None  # the CUDA graphs' shared memory pool
        # Why a capture failed, per (cache, search): that search runs the compiled step uncaptured.
        self.capture_failures: dict[tuple, str] = {}

    # ------------------------------------------------------------------ caches and steps

    def cache(self, rows: int, max_cache_len: int) -> StaticCache:
        """The cache for (rows, length) on the model's device/dtype, allocated once, LRU-kept."""
        return self._cache(self._caches, rows, max_cache_len)

    def prefill_cache(self, rows: int, max_cache_len: int) -> StaticCache:
        """Beam search's per-image prefill cache (`prefill_beams`), kept apart so it never
        evicts a decode cache; LRU-kept with the same bound, 1/K of the decode caches' size."""
        return self._cache(self._prefill_caches, rows, max_cache_len)

    def _key(self, rows: int, max_cache_len: int) -> tuple:
        # The activations' dtype and device (also under weight quantization).
        return (rows, max_cache_len, self.llm.dtype, self.llm.device)

    def _cache(self, store: OrderedDict, rows: int, max_cache_len: int) -> StaticCache:
        key = self._key(rows, max_cache_len)
        cache = store.get(key)
        if cache is None:
            cache = store[key] = allocate_cache(self.llm, rows, max_cache_len)
            while len(store) > self.max_caches:
                evicted, _ = store.popitem(last=False)
                if store is self._caches:
                    self._programs.pop(evicted, None)  # its states and graphs hold the cache
        store.move_to_end(key)
        return cache

    def clear(self) -> None:
        """Drop every cache, search state and captured graph (frees their memory)."""
        self._caches.clear()
        self._prefill_caches.clear()
        self._programs.clear()

    def step_fn(self, token_step):
        """`token_step` (`greedy_token_step` or `beam_token_step`), compiled on first use when
        `compile` is set."""
        if not self.compiled:
            return token_step
        fn = self._compiled_fns.get(token_step)
        if fn is None:
            options = None
            if self._compile_mode is None and self.llm.device.type == "cuda":
                options = cuda_step_options(getattr(self.llm, "vlv_quantization", None),
                                            inductor_graphs=not self.capture)
            fn = torch.compile(token_step, fullgraph=True, dynamic=False, mode=self._compile_mode, options=options)
            self._compiled_fns[token_step] = fn
        return fn

    def _program(self, cache: StaticCache, rows: int, length: int, search: tuple, token_step, make_state):
        """(state, runner) of one search on one cache, made once: `runner(filled)` runs one
        token (`filled`: the cache positions filled so far, for the eager beam reordering)."""
        programs = self._programs.setdefault(self._key(rows, length), {})
        program = programs.get(search)
        if program is None:
            state, fn = make_state(), self.step_fn(token_step)
            graph = self._capture(fn, cache, state, (rows, length, *search)) if self.capture else None
            if graph is not None:
                def runner(filled: int) -> None:
                    graph()
            elif self.compiled or token_step is greedy_token_step:
                def runner(filled: int) -> None:
                    fn(self.llm, cache, state)
            else:
                def runner(filled: int) -> None:
                    fn(self.llm, cache, state, filled)
            program = programs[search] = (state, runner)
        return program

    def _capture(self, fn, cache: StaticCache, state, key: tuple) -> CapturedStep | None:
        """`fn(llm, cache, state)` captured into a CUDA graph, or None when capture fails.
        A step that cannot be captured (an operation CUDA forbids while capturing, in a
        quantization library's kernels say) still decodes correctly uncaptured, only with
        the host's per-call cost: the failure is logged and kept in `capture_failures`
        (the decode benchmark reports it) rather than failing the caption. An error of
        the step itself (in a warm-up call) propagates."""
        if state.capacity < 2:
            # A cache with room for one new token never runs a token step (the prefill
            # chooses that token), and the warm-up's second step would write past the
            # search state's last column: inductor's bounds check is a device-side assert,
            # which leaves the CUDA context unusable.
            return None
        state.reset(state.real.shape[0], state.capacity)  # valid indices while warming up
        if self._pool is None:
            self._pool = graph_pool()
        try:
            return CapturedStep(lambda: fn(self.llm, cache, state), pool=self._pool)
        except CaptureError as err:
            cause = err.__cause__ or err  # CUDA's own error, as the capture raised it
            reason = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            self.capture_failures[key] = reason
            log.warning("CUDA graph capture of the decode step failed (%s); this search runs the compiled step "
                        "without it", reason)
            return None

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
        with decode_threads(self.llm):
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
        beams, max_new = gen.num_beams, gen.max_new_tokens
        least = min_step_rows(getattr(self.llm, "vlv_quantization", None), self.llm.device.type, self.compiled)
        rows = bucket_batch(max(n, -(-least // beams)), self.batch_buckets)
        if max_new < 1:
            return torch.empty((n, 0), dtype=torch.long, device=prefix.device)
        # 1. The cache and the search's state for this bucket (made once, then reused).
        length = round_up(nq + max_new, self.length_multiple)
        cache = self.cache(rows * beams, length)
        capacity, device = length - nq, prefix.device  # the most new tokens this cache holds
        if beams == 1:
            state, run = self._program(
                cache, rows, length, ("greedy", eos, pad, nq), greedy_token_step,
                lambda: GreedyState.allocate(rows, capacity, eos=eos, pad=pad, prefix_len=nq, device=device))
            state.reset(n, max_new)
        else:
            search = ("beam", beams, eos, pad, nq, gen.length_penalty, gen.early_stopping)
            state, run = self._program(
                cache, rows * beams, length, search, beam_token_step,
                lambda: BeamState.allocate(rows, beams, capacity, eos=eos, pad=pad, prefix_len=nq,
                                           length_penalty=gen.length_penalty, early_stopping=gen.early_stopping,
                                           device=device))
            state.reset(n, max_new)
        # 2. Pad to the bucket with zero rows (dropped at the end); prefill into the reset
        # cache, one row per beam (row b*K + k); choose the first token.
        x = torch.cat([prefix, prefix.new_zeros(rows - n, nq, hidden)]) if rows > n else prefix  # [rows, Nq, H]
        cache.reset()
        if beams == 1:
            greedy_update(state, prefill(self.llm, cache, x))  # [rows, V]
        else:
            beam_update(state, prefill_beams(self.llm, cache, self.prefill_cache(rows, length), x, beams))
        # 3. One token step per new token; the host reads the "still running?" flag every
        # `check_every` tokens (on CUDA each read waits for the GPU).
        check_every = stop_check_interval(device)
        running = state.alive if beams == 1 else state.go
        steps = 1
        while steps < max_new:
            if steps % check_every == 0 and not bool(running):
                break
            run(nq + steps - 1)
            steps += 1
        return state.result(n, steps) if beams == 1 else state.result(n)


def make_decoder(kind: str, llm: PreTrainedModel) -> CaptionLLMDecoder:
    """"reference" (HF generate), "static" (static cache, eager step) or "compiled" (the step
    under torch.compile)."""
    if kind == "reference":
        return ReferenceDecoder(llm)
    if kind in ("static", "compiled"):
        return StaticDecoder(llm, compile=kind == "compiled")
    raise ValueError(f"unknown decoder {kind!r}; choose one of {list(DECODERS)}")
