"""The two pipelines every suite compares, built from the same weights.

* reference: the official code's way: fp32, eager attention, eager encoder, HF
  `generate` (`Engine(decoder="reference", encoder_backend="eager")`);
* fast: `Engine(dtype=fast_dtype, decoder="compiled" | "static", encoder_backend="auto",
  quantize=scheme, encoder_quantize=scheme or None)`.

Presets ("tiny" too, for the test suites): "nano" loads the bundled model folder (whatever its preset); "small" and
"paper" build random weights at their preset's dimensions, rounded to bf16 values so
that a bf16 fast path holds exactly the reference's weights. Random models emit EOS at
random, so captions have a fixed length: both pipelines get an EOS id no token can take
(`never_eos`), the same for both, and decode exactly `new_tokens` tokens.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch

from vlv_engine.config import GenerationConfig
from vlv_engine.engine.decode import make_decoder


@dataclass
class BenchSetup:
    preset: str
    device: torch.device
    fast: object  # Engine
    reference: object  # Engine
    fast_decoder: object  # CaptionLLMDecoder over fast.llm
    reference_decoder: object
    new_tokens: int
    num_beams: int
    notes: dict = field(default_factory=dict)

    @property
    def never_eos(self) -> int:
        return self.reference.model.caption_decoder.llm.config.get_text_config(decoder=True).vocab_size

    def generation(self, num_beams: int | None = None) -> GenerationConfig:
        # early_stopping and length_penalty stay the model's defaults, identical for both.
        return self.reference.generation_config(max_new_tokens=self.new_tokens,
                                                num_beams=num_beams or self.num_beams)

    def describe(self) -> dict:
        return {"preset": self.preset, "new_tokens": self.new_tokens, "num_beams": self.num_beams, **self.notes}


def has_encoder_backends() -> bool:
    from vlv_engine.engine.engine import Engine

    return "encoder_backend" in inspect.signature(Engine.__init__).parameters and hasattr(Engine, "encode_pixels")


def encode(engine, pixels: torch.Tensor) -> torch.Tensor:
    """Normalized pixels [B, 3, S, S] -> caption embedding [B, Nq, D] on the engine's encoder path."""
    if hasattr(engine, "encode_pixels"):
        return engine.encode_pixels(pixels)
    with torch.no_grad():
        return engine.model.caption_embedding(pixels.to(engine.device, engine.dtype))


@torch.no_grad()
def caption_tokens(engine, decoder, pixels: torch.Tensor, gen: GenerationConfig, eos: int) -> torch.Tensor:
    """Pixels [B, 3, S, S] -> caption token ids [B, T]: encoder, psi, LLM decode."""
    cd = engine.model.caption_decoder
    prefix = cd.prefix(encode(engine, pixels)).to(cd.llm.dtype)  # [B, Nq, H]
    return decoder.generate(prefix, gen, eos_token_id=eos, pad_token_id=0)


def _random_model(name: str, seed: int, device: torch.device | None = None):
    from vlv_engine.config import preset
    from vlv_engine.models import VLVModel

    config = preset(name)
    if not config.encoder.prompt_ids:
        # No Florence-2 tokenizer here: stand-in ids of the real task prompt's length
        # (<s> + 10 BPE tokens of "Describe in detail what is shown in the image." + </s>).
        config.encoder.prompt_ids = [0, *range(1000, 1010), 2]
    torch.manual_seed(seed)
    # Built where it runs: the paper preset's ~4B parameters initialise in seconds on a GPU
    # and in minutes on its host's CPU (the values differ per device; each run is seeded).
    with torch.device(device or "cpu"):
        model = VLVModel.from_config(config, with_diffusion=False).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))  # bf16 values: a bf16 fast path holds the same weights
    return model, None


def load_model(preset: str, seed: int = 0, with_diffusion: bool = False, device: str | torch.device | None = None):
    """(VLVModel in fp32, llm tokenizer or None): random presets are built on `device`
    (default the CPU), loaded ones on the CPU."""
    if preset == "nano":
        from vlv_engine.checkpoint.folder import load_folder
        from vlv_engine.engine.engine import default_model_path

        loaded = load_folder(default_model_path(), dtype=torch.float32, load_diffusion=with_diffusion)
        return loaded.model.eval().requires_grad_(False), loaded.llm_tokenizer
    if preset in ("small", "paper"):
        return _random_model(preset, seed, torch.device(device) if device is not None else None)
    if preset == "tiny":  # the test suites' model
        from vlv_engine.testing import tiny_model

        return tiny_model(seed, with_diffusion=with_diffusion).requires_grad_(False), None
    raise ValueError(f"unknown bench preset {preset!r}; choose nano, small or paper (or tiny, for tests)")


PRESET_DEFAULTS = {
    # fixed caption length (new tokens), beams
    "tiny": (8, 2),
    "nano": (16, 1),
    "small": (32, 4),
    "paper": (300, 4),
}


def build_setup(preset: str, *, device: str | torch.device = "cpu", fast_dtype: torch.dtype | None = None,
                quantize: str | None = None, compile_decoder: bool = True, new_tokens: int | None = None,
                num_beams: int | None = None, encoder_backend: str = "auto", with_diffusion: bool = False,
                seed: int = 0, encoder_quantize: str | None = None,
                encoder_batch_size: int | None = None) -> BenchSetup:
    from vlv_engine.engine.engine import Engine

    device = torch.device(device)
    if preset == "paper" and device.type != "cuda":
        raise ValueError("the paper preset runs on a GPU only (--device cuda)")
    model, _ = load_model(preset, seed, with_diffusion=with_diffusion, device=device)
    default_tokens, default_beams = PRESET_DEFAULTS[preset]
    fast_dtype = fast_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    enc_kwargs = {}
    notes: dict = {"fast_dtype": str(fast_dtype).replace("torch.", ""), "quantize": quantize or "none",
                   "encoder_quantize": encoder_quantize or "none",
                   "fast_decoder": "compiled" if compile_decoder else "static"}
    if has_encoder_backends():
        enc_kwargs = {"encoder_backend": encoder_backend}
        ref_kwargs = {"encoder_backend": "eager"}
    else:
        ref_kwargs = {}
        notes["encoder_backend"] = "unavailable in this Engine: both encoders eager"
    reference = Engine(eager_attention(copy.deepcopy(model)), device=device, dtype=torch.float32,
                       decoder="reference", **ref_kwargs)
    fast = Engine(model, device=device, dtype=fast_dtype, decoder="compiled" if compile_decoder else "static",
                  quantize=quantize, encoder_batch_size=encoder_batch_size, **enc_kwargs,
                  **({"encoder_quantize": encoder_quantize} if encoder_quantize else {}))
    if encoder_quantize == "auto":  # what auto took on this machine
        notes["encoder_quantize"] = f"{fast.encoder_quantize} (auto)"
    if enc_kwargs:
        notes["encoder_backend"] = fast.encoder_backend.name
    notes["encoder_batch_size"] = fast.encoder_batch_size
    fast_llm, ref_llm = fast.model.caption_decoder.llm, reference.model.caption_decoder.llm
    return BenchSetup(preset=preset, device=device, fast=fast, reference=reference,
                      fast_decoder=make_decoder(fast.decoder, fast_llm),
                      reference_decoder=make_decoder("reference", ref_llm),
                      new_tokens=new_tokens or default_tokens, num_beams=num_beams or default_beams, notes=notes)


def eager_attention(model):
    """The reference's attention: every transformers model inside `model` switched to its
    "eager" implementation (matmul, softmax, matmul), as the official code runs it."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation != "eager":
            module.set_attn_implementation("eager")
    return model


def random_pixels(engine, batch: int, seed: int = 0) -> torch.Tensor:
    """Normalized random pixels [B, 3, S, S] (what `Engine.pixel_values` returns)."""
    size = engine.config.encoder.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def token_match(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two [B, T] token tensors agree (the shorter padded)."""
    t = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a.cpu(), (0, t - a.shape[1]), value=-1)
    b = torch.nn.functional.pad(b.cpu(), (0, t - b.shape[1]), value=-2)
    return float((a == b).float().mean()) if a.numel() else 1.0
