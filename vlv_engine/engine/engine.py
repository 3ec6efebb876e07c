"""Engine: caption, embed and reconstruct images with a VLV model.

Every entry point shares one image path (`vlv_engine.images`): load -> RGB ->
one resize to the encoder's input size -> normalize. The encoder path ends in the
caption embedding [B, Nq, D]; captions decode it with the LLM, reconstructions
with the diffusion decoder.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from vlv_engine import images as image_io
from vlv_engine.config import GenerationConfig, VLVConfig
from vlv_engine.engine.backends.select import (BackendChoice, UNetRunner, build_unet_runner,
                                               build_vae_decoder_runner, select_backend)
from vlv_engine.engine.decode import DECODERS, make_decoder, prepare_llm
from vlv_engine.engine.encoder_path import build_encoder_path
from vlv_engine.engine.encoder_quant import check_encoder_scheme, quantize_encoder, resolve_encoder_scheme
from vlv_engine.engine.encoder_select import select_encoder_backend
from vlv_engine.engine.inplace_activations import inplace_mlp_activations
from vlv_engine.engine.postprocess import official_postprocess
from vlv_engine.engine.quantize import check_scheme, quantize_llm
from vlv_engine.engine.results import ItemResult
from vlv_engine.engine.unread_tables import move_unread_tables
from vlv_engine.engine.vision_attention import use_vision_attention
from vlv_engine.engine.warm_up import warm_up_sizes
from vlv_engine.models import VLVModel

DEFAULT_BATCH_SIZE = 8
# The most pixels per encoder forward by default (see Engine.__init__).
ENCODER_PIXELS = 2 * 768 * 768


def default_model_path() -> Path:
    """The model bundled inside the package."""
    return Path(__file__).resolve().parent.parent / "assets" / "default_model"


class Engine:
    def __init__(self, model: VLVModel, *, llm_tokenizer=None, text_tokenizer=None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_pixels: int | None = image_io.DEFAULT_MAX_PIXELS,
                 batch_size: int = DEFAULT_BATCH_SIZE, decoder: str = "static",
                 unet_backend: str | UNetRunner = "eager", encoder_backend: str = "eager", quantize: str | None = None,
                 encoder_batch_size: int | None = None, encoder_quantize: str | None = None):
        # decoder: how captions are decoded from the prefix: "static" (our static-KV-cache
        # loop, `vlv_engine.engine.decode`; the default: in fp32 its tokens equal HF's, its
        # KV memory is allocated once per batch bucket, and on a CPU it is as fast as HF or
        # faster), "compiled" (the same with the decode step under torch.compile: each new
        # batch bucket compiles once, tens of seconds on a CPU) or "reference" (HF `generate`,
        # the oracle).
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {list(DECODERS)}")
        self.decoder = decoder
        # quantize: None or a scheme of `vlv_engine.engine.quantize` ("int8_weight_only",
        # "int8_dynamic", "int4_weight_only", "fp8", "int4_cpu", "int8_cpu", "int8_dynamic_cpu"), applied to the LLM only,
        # in place, after it is placed; an unknown scheme or one that cannot run here fails now.
        self.quantize = quantize
        if quantize is not None:
            check_scheme(quantize, device)
        # encoder_quantize: None, "int8_dynamic" (Florence-2's linears in int8), "bf16"
        # (Florence-2 in bfloat16, on CPUs with AMX or AVX512-BF16) or "auto" (bf16 with
        # AMX, else int8): CPU, float32 engines (`vlv_engine.engine.encoder_quant`).
        encoder_quantize = resolve_encoder_scheme(encoder_quantize)
        self.encoder_quantize = encoder_quantize
        if encoder_quantize is not None:
            encoder_backend = check_encoder_scheme(encoder_quantize, device, dtype, encoder_backend)
        self._llm_decoder = None  # built on first use (caption_embeddings)
        self.device = torch.device(device)
        # encoder_batch_size: the most images per encoder forward (a caption batch is split
        # into such chunks; in eager an image's embedding does not depend on its chunk).
        # The encoder's activations grow with pixels, so by default a forward holds at most
        # ENCODER_PIXELS (two 768 px images). On a CPU that cuts the small preset's peak
        # RSS at batch 8 by ~1.3 GB (and 2 cores are already busy at that size). On a GPU
        # it keeps the paper model's encoder to ~0.4 GB of activations (1.5 GB for 8 images,
        # counted on the meta device), so the bf16 caption path at batch 8 fits in 10 GB
        # beside its 7.6 GiB of weights (8.5 GiB in all, `bench.memory_estimate`); a large
        # GPU recaptioning at volume can raise it.
        # The tiny nano images still go in whole batches.
        if encoder_batch_size is None:
            size = model.config.encoder.image_size
            encoder_batch_size = max(1, ENCODER_PIXELS // (size * size))
        if encoder_batch_size < 1:
            raise ValueError(f"encoder_batch_size must be >= 1, got {encoder_batch_size}")
        self.encoder_batch_size = min(encoder_batch_size, batch_size)
        self.dtype = dtype
        self.model = model.eval()
        self.model.requires_grad_(False)
        parts = [(self.model.encoder, dtype), (self.model.bottleneck, dtype), (self.model.caption_decoder, dtype)]
        if self.model.diffusion is not None:
            parts += [(self.model.diffusion.unet, dtype), (self.model.diffusion.vae, self.model.diffusion.vae_dtype)]
        for module, want in parts:
            if module is not None:
                _place(module, self.device, want)
        if self.model.encoder is not None:
            inplace_mlp_activations(self.model.encoder)  # fc1 -> GELU in place: the encoder's largest buffer
            use_vision_attention(self.model.encoder)  # DaViT's channel attention as two products
            self.model.encoder.freeze_prompt()
        if self.device.type != "cpu" and self.model.diffusion is None:
            move_unread_tables(self.model, "cpu")  # 0.19 GiB of the paper model's GPU memory
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # free for other processes too, not only this one's allocator
        if decoder != "reference" and self.model.caption_decoder is not None:
            prepare_llm(self.model.caption_decoder.llm)  # "reference" keeps HF's model as it is
        if quantize is not None and self.model.caption_decoder is not None:
            quantize_llm(self.model.caption_decoder.llm, quantize, device=self.device)
            _return_freed_memory()
        if encoder_quantize is not None:
            quantize_encoder(self.model, encoder_quantize)
            _return_freed_memory()
        self.llm_tokenizer = llm_tokenizer
        self.text_tokenizer = text_tokenizer
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self._uncond: torch.Tensor | None = None
        # unet_backend: "eager" | "auto" | "onnx" | "tensorrt" | "compile", or a UNetRunner
        # (vlv_engine.engine.backends). Chosen here (an unknown or unavailable one fails
        # now), built on the first reconstruct (an ONNX export or engine build is not free).
        self._unet_runner = None if isinstance(unet_backend, str) else unet_backend
        self._vae_runner = None
        self.unet_backend = (select_backend(unet_backend, device=self.device, dtype=dtype)
                             if isinstance(unet_backend, str) else BackendChoice("custom", "a UNetRunner given"))
        # encoder_backend: "eager" | "auto" | "compile" | "triton" for pixels -> caption
        # embedding (vlv_engine.engine.encoder_select). Chosen here (an unknown or unavailable
        # one fails now), built on the first encode (a compile is not free).
        self.encoder_backend = select_encoder_backend(encoder_backend, device=self.device, dtype=dtype)
        self._encoder_path = None
        # The model's buffers are shared by every call: the decoder's KV caches and search
        # states, the CUDA graphs' static inputs, the lazily built runners. Threads sharing
        # an engine take turns on them (images are still decoded in parallel); for
        # throughput, batch requests instead (`vlv serve`, `vlv_engine.serve`).
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:
        # Pickled for Ray actors (`ray.put(engine)`): the model and its settings travel. A
        # lock, and what earlier calls built in this process (the decode loop, a compiled
        # encoder path, UNet runners: closures, compiled code, CUDA graphs), are per process:
        # the copy builds its own on first use.
        state = self.__dict__.copy()
        del state["_lock"]
        state["_llm_decoder"] = state["_encoder_path"] = None
        if self.unet_backend.name != "custom":  # a runner given by the caller travels as it is
            state["_unet_runner"] = state["_vae_runner"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, load_caption_decoder: bool = True,
                        load_diffusion: bool = True, **kwargs: Any) -> "Engine":
        """Load a model folder; no path means the bundled default model."""
        from vlv_engine.checkpoint.folder import load_folder

        loaded = load_folder(default_model_path() if path is None else path, dtype=dtype,
                             load_caption_decoder=load_caption_decoder, load_diffusion=load_diffusion)
        return cls(loaded.model, llm_tokenizer=loaded.llm_tokenizer, text_tokenizer=loaded.text_tokenizer,
                   device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_official(cls, *, stage2: str | Path | None = None, stage1: str | Path | None = None,
                      florence2: str | Path, stable_diffusion: str | Path | None = None,
                      llm: str | Path | None = None, num_queries: int | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      **kwargs: Any) -> "Engine":
        """Load the released checkpoints (the paths are those of
        `vlv_engine.checkpoint.official.load_official`); `kwargs` are the engine's options,
        as in `from_pretrained`."""
        from vlv_engine.checkpoint.official import load_official

        loaded = load_official(stage2=stage2, stage1=stage1, florence2=florence2, stable_diffusion=stable_diffusion,
                               llm=llm, num_queries=num_queries, dtype=dtype)
        return cls(loaded.model, llm_tokenizer=loaded.llm_tokenizer, text_tokenizer=loaded.text_tokenizer,
                   device=device, dtype=dtype, **kwargs)

    def save_pretrained(self, path: str | Path) -> Path:
        from vlv_engine.checkpoint.folder import save_folder

        return save_folder(path, self.model, llm_tokenizer=self.llm_tokenizer, text_tokenizer=self.text_tokenizer)

    @property
    def config(self) -> VLVConfig:
        return self.model.config

    # ------------------------------------------------------------------ images

    def load_images(self, images: Sequence[Any] | Any) -> list[Image.Image]:
        """Decode every input, raising `ImageInputError` (naming the item) on the first bad one."""
        items = _as_list(images)
        loaded, _ = image_io.load_batch(items, max_pixels=self.max_pixels, on_error="raise")
        return loaded

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        enc = self.config.encoder
        pixels = image_io.preprocess(list(images), enc.image_size, enc.image_mean, enc.image_std)
        return pixels.to(self.device, self.dtype)  # [B, 3, S, S]

    def _chunks(self, n: int, batch_size: int | None):
        step = batch_size or self.batch_size
        for start in range(0, n, step):
            yield start, min(n, start + step)

    # ------------------------------------------------------------------ embed

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalized pixels [B, 3, S, S] (`pixel_values`) -> caption embedding [B, Nq, D],
        through the encoder backend chosen at construction (`self.encoder_backend`)."""
        size = self.config.encoder.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 \
                or tuple(pixel_values.shape[1:]) != (3, size, size):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"encode_pixels: pixel_values must be a [B, 3, {size}, {size}] tensor, got {got}")
        pixel_values = pixel_values.to(self.device, self.dtype)
        with self._lock:
            if self._encoder_path is None:
                self._encoder_path = build_encoder_path(self.encoder_backend, self.model,
                                                        max_batch=self.encoder_batch_size)
            if pixel_values.shape[0] <= self.encoder_batch_size:
                return self._encoder_path(pixel_values)
            return torch.cat([self._encoder_path(chunk) for chunk in pixel_values.split(self.encoder_batch_size)])

    @torch.no_grad()
    def embed_loaded(self, images: Sequence[Image.Image], batch_size: int | None = None) -> torch.Tensor:
        outs = []
        for lo, hi in self._chunks(len(images), batch_size):
            outs.append(self.encode_pixels(self.pixel_values(images[lo:hi])))
        return torch.cat(outs) if outs else torch.empty(0)

    def embed(self, images: Sequence[Any] | Any, *, batch_size: int | None = None) -> torch.Tensor:
        """Caption embeddings [B, Nq, D] of the images."""
        return self.embed_loaded(self.load_images(images), batch_size)

    # ------------------------------------------------------------------ caption

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        return self.config.generation.merged(**overrides)

    @torch.no_grad()
    def caption_embeddings(self, embeddings: torch.Tensor, *, batch_size: int | None = None,
                           **generation: Any) -> list[str]:
        """Decode caption embeddings [B, Nq, D] into text (no image encoding)."""
        decoder = self.model.caption_decoder
        if decoder is None or self.llm_tokenizer is None:
            raise RuntimeError("this engine was loaded without a caption decoder (llm/ folder and tokenizer)")
        gen = self.generation_config(**generation)
        tok = self.llm_tokenizer
        texts: list[str] = []
        with self._lock:
            if self._llm_decoder is None or self._llm_decoder.llm is not decoder.llm:
                self._llm_decoder = make_decoder(self.decoder, decoder.llm)
            for lo, hi in self._chunks(embeddings.shape[0], batch_size):
                prefix = decoder.prefix(embeddings[lo:hi].to(self.device)).to(decoder.llm.dtype)  # [b, Nq, H]
                ids = self._llm_decoder.generate(prefix, gen, eos_token_id=tok.eos_token_id,
                                                 pad_token_id=tok.pad_token_id)  # [b, T]
                texts.extend(t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True))
        if gen.postprocess:
            texts = [official_postprocess(t) for t in texts]
        return texts

    def caption(self, images: Sequence[Any] | Any, *, batch_size: int | None = None, **generation: Any) -> list[str]:
        """One caption per image. Generation options (max_new_tokens, num_beams, early_stopping,
        length_penalty, postprocess) override the model's defaults for this call."""
        self.generation_config(**generation)  # reject unknown options before any work
        loaded = self.load_images(images)
        return self.caption_embeddings(self.embed_loaded(loaded, batch_size), batch_size=batch_size, **generation)

    def caption_results(self, images: Sequence[Any] | Any, *, batch_size: int | None = None,
                        **generation: Any) -> list[ItemResult[str]]:
        """Like `caption`, but a bad input costs only its own result: each item carries a
        caption or the error (an `ImageInputError` naming the input and the reason)."""
        self.generation_config(**generation)
        items = _as_list(images)
        loaded, errors = image_io.load_batch(items, max_pixels=self.max_pixels, on_error="collect")
        good = [i for i, err in enumerate(errors) if err is None]
        captions = self.caption_embeddings(self.embed_loaded([loaded[i] for i in good], batch_size),
                                           batch_size=batch_size, **generation) if good else []
        by_index = dict(zip(good, captions))
        return [ItemResult(i, value=by_index.get(i), error=errors[i]) for i in range(len(items))]

    def warm_up(self, max_batch_size: int | None = None, **generation: Any) -> list[int]:
        """Caption blank images so that later calls of up to `max_batch_size` images
        (default: `batch_size`) compile nothing: with compiled parts, one batch per batch
        bucket (`vlv_engine.engine.warm_up`), else one image. Generation options as in
        `caption` (other options compile their own decode steps on first use). Returns the
        batch sizes captioned."""
        size = self.config.encoder.image_size
        blank = Image.new("RGB", (size, size), (255, 255, 255))
        sizes = warm_up_sizes(self, self.batch_size if max_batch_size is None else max_batch_size)
        for n in sizes:
            self.caption([blank] * n, batch_size=n, **generation)
        return sizes

    # ------------------------------------------------------------------ reconstruct

    @torch.no_grad()
    def unconditional_embedding(self) -> torch.Tensor:
        """The text encoder on the empty prompt padded to Nq: [1, Nq, D], computed once."""
        with self._lock:
            return self._unconditional_embedding()

    def _unconditional_embedding(self) -> torch.Tensor:
        if self._uncond is None:
            if self.text_tokenizer is None:
                raise RuntimeError("reconstruct needs the text encoder's tokenizer (tokenizer/ folder) "
                                   "for the unconditional prompt")
            nq = self.config.encoder.num_queries
            ids = self.text_tokenizer("", padding="max_length", max_length=nq, truncation=True,
                                      return_tensors="pt").input_ids.to(self.device)
            self._uncond = self.model.bottleneck.encode_ids(ids)
        return self._uncond

    @torch.no_grad()
    def reconstruct(self, images: Sequence[Any] | Any, *, steps: int | None = None,
                    guidance_scale: float | None = None, seed: int = 0, sampler: str | None = None,
                    batch_size: int | None = None) -> list[Image.Image]:
        """Images regenerated from their caption embeddings by the diffusion decoder.

        Each image's noise comes from its own generator seeded with `seed`, so the
        result for an image does not depend on the batch it is in. `sampler` is "ddpm",
        "ddim" or "dpm" (DPM-Solver++); None uses the model's own scheduler."""
        diffusion = self.model.diffusion
        if diffusion is None:
            raise RuntimeError("this engine has no diffusion decoder (caption-only model, or loaded with "
                               "load_diffusion=False)")
        cfg = self.config.diffusion
        steps = steps or cfg.num_inference_steps
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        loaded = self.load_images(images)
        diffusion.make_scheduler(sampler)  # reject an unknown sampler before any work
        with self._lock:
            return self._reconstruct(loaded, diffusion, steps=steps, guidance=guidance, seed=seed, sampler=sampler,
                                     batch_size=batch_size)

    def _reconstruct(self, loaded: list[Image.Image], diffusion, *, steps: int, guidance: float, seed: int,
                     sampler: str | None, batch_size: int | None) -> list[Image.Image]:
        uncond = self._unconditional_embedding()
        if self._unet_runner is None and self.unet_backend.name != "eager":
            self._unet_runner = build_unet_runner(self.unet_backend, diffusion, max_batch=self.batch_size,
                                                  num_queries=self.config.encoder.num_queries,
                                                  device=self.device, dtype=self.dtype)
            # The VAE decoder follows the UNet onto the same backend (its own export and cache).
            self._vae_runner = build_vae_decoder_runner(self.unet_backend, diffusion, max_batch=self.batch_size,
                                                        device=self.device, dtype=self.dtype)
        diffusion.set_unet_backend(self._unet_runner)
        diffusion.set_vae_decoder_backend(self._vae_runner)
        out: list[Image.Image] = []
        for lo, hi in self._chunks(len(loaded), batch_size):
            cond = self.encode_pixels(self.pixel_values(loaded[lo:hi]))
            gens = [torch.Generator(device=self.device).manual_seed(seed) for _ in range(hi - lo)]
            pixels = diffusion.sample(cond, uncond, steps=steps, guidance_scale=guidance, generators=gens,
                                      scheduler=diffusion.make_scheduler(sampler))
            out.extend(_to_pil(p) for p in pixels)
        return out


def _return_freed_memory() -> None:
    """Hand the float weights that quantization just freed back to the OS: glibc keeps
    freed heap pages (~0.4 GB of the small preset's LLM) in the process otherwise."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Cast only when needed: diffusers warns on every dtype cast, even a no-op one.
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    if any(p.device != device for p in module.parameters()):
        module.to(device=device)


def _as_list(images: Sequence[Any] | Any) -> list[Any]:
    # A single image (path, PIL image, array, tensor) is a batch of one.
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB PIL image."""
    arr = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")
