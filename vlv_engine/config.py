"""Configuration of a VLV model: one dataclass per module, and named presets.

The transformers/diffusers components keep their own config classes; here they
are stored as plain dicts (what `from_dict`/`from_config` accept) so a preset is
data, not code, and `vlv.json` can be read without importing torch.

Presets:
- ``tiny``:  random weights, runs in seconds on a CPU; used by the tests.
- ``nano``:  the architecture of the bundled Shapes World model (64 px images).
- ``small``: Florence-2-base / CLIP-L text / Qwen2.5-0.5B dimensions (CPU benchmarks).
- ``paper``: Florence-2-large / SD-2.1-base / Qwen2.5-3B dimensions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MORE_DETAILED_CAPTION = "<MORE_DETAILED_CAPTION>"
# What Florence-2's processor expands the task token into before tokenizing.
MORE_DETAILED_CAPTION_TEXT = "Describe in detail what is shown in the image."

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    """Florence-2 (vision tower + BART encoder/decoder) + learnable queries + language_proj."""

    florence: dict[str, Any]  # Florence2Config kwargs: vision_config, text_config
    num_queries: int = 77
    image_size: int = 768
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    prompt: str = MORE_DETAILED_CAPTION
    # Token ids of the (expanded) prompt; fixed for every image, so tokenized once.
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def hidden_size(self) -> int:
        return int(self.florence["text_config"]["d_model"])


@dataclass
class BottleneckConfig:
    """The frozen CLIP text encoder run on the projected queries."""

    text_encoder: dict[str, Any]  # CLIPTextConfig kwargs

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder["hidden_size"])


@dataclass
class CaptionDecoderConfig:
    """psi (Linear -> GELU -> Linear) + any causal LM that AutoModelForCausalLM builds."""

    llm: dict[str, Any]  # must hold "model_type"

    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])


@dataclass
class DiffusionConfig:
    """The frozen text-to-image decoder: UNet2DConditionModel + AutoencoderKL + scheduler."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]  # must hold "_class_name"
    guidance_scale: float = 2.0
    num_inference_steps: int = 50
    # Extra UNet input channels holding the (x, y) coordinates of each latent pixel (2),
    # optionally with sine/cosine octaves of each (2 + 4k). A small convolutional UNet
    # barely knows where it is in the image, so it cannot tie "top left" in its
    # conditioning to a place; SD-2.1 does not need them (0).
    coord_channels: int = 0


@dataclass
class GenerationConfig:
    """Caption decoding defaults; every field can be overridden per call."""

    max_new_tokens: int = 300
    num_beams: int = 4
    early_stopping: bool = True
    length_penalty: float = 1.0
    # The official post-processing: trim after the last period, drop repeated sentences.
    postprocess: bool = False

    def merged(self, **overrides: Any) -> "GenerationConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown generation option(s): {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class VLVConfig:
    name: str
    encoder: EncoderConfig
    bottleneck: BottleneckConfig
    caption_decoder: CaptionDecoderConfig
    diffusion: DiffusionConfig | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLVConfig":
        data = copy.deepcopy(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"vlv.json format_version {version} is newer than this vlv-engine supports ({FORMAT_VERSION})")
        enc = data["encoder"]
        enc["image_mean"] = tuple(enc["image_mean"])
        enc["image_std"] = tuple(enc["image_std"])
        diffusion = data.get("diffusion")
        return cls(
            name=data["name"],
            encoder=EncoderConfig(**enc),
            bottleneck=BottleneckConfig(**data["bottleneck"]),
            caption_decoder=CaptionDecoderConfig(**data["caption_decoder"]),
            diffusion=DiffusionConfig(**diffusion) if diffusion else None,
            generation=GenerationConfig(**data.get("generation", {})),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "VLVConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- presets


def _davit(embed_dim, depths, num_heads, num_groups, projection_dim, window_size=12) -> dict[str, Any]:
    n = len(embed_dim)
    return {
        "embed_dim": list(embed_dim),
        "depths": list(depths),
        "num_heads": list(num_heads),
        "num_groups": list(num_groups),
        "patch_size": [7] + [3] * (n - 1),
        "patch_stride": [4] + [2] * (n - 1),
        "patch_padding": [3] + [1] * (n - 1),
        "patch_prenorm": [False] + [True] * (n - 1),
        "window_size": window_size,
        "projection_dim": projection_dim,
        "drop_path_rate": 0.0,
    }


def _bart(d_model, layers, heads, ffn, vocab_size, max_positions=1024) -> dict[str, Any]:
    return {
        "model_type": "bart",
        "d_model": d_model,
        "encoder_layers": layers,
        "decoder_layers": layers,
        "encoder_attention_heads": heads,
        "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": ffn,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_positions,
        "scale_embedding": False,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_eos_token_id": 2,
    }


def _clip_text(hidden, layers, heads, intermediate, vocab_size, max_positions=77, act="gelu") -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_positions,
        "hidden_act": act,
        "projection_dim": hidden,
    }


def _qwen2(hidden, layers, heads, kv_heads, intermediate, vocab_size, tie=True, max_positions=32768) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tie,
    }


def _ddpm() -> dict[str, Any]:
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def _tiny() -> VLVConfig:
    d = 32
    return VLVConfig(
        name="tiny",
        encoder=EncoderConfig(
            # Two DaViT stages (stride 8): a 32 px image gives 4*4 + 1 = 17 image tokens.
            florence={
                "vision_config": _davit((16, 32), (1, 1), (1, 2), (1, 2), projection_dim=d, window_size=2),
                # A wide init makes a random model's queries depend on the image, so
                # tests can tell images apart by their captions.
                "text_config": {**_bart(d, 1, 2, 64, vocab_size=64, max_positions=64), "init_std": 0.5},
            },
            num_queries=8,
            image_size=32,
            prompt="describe",
            prompt_ids=[0, 5, 6, 7, 2],
        ),
        # Special ids follow the word-level tokenizers: <pad>=0, <s>=2, </s>=3.
        bottleneck=BottleneckConfig({**_clip_text(d, 2, 2, 64, vocab_size=64, max_positions=16),
                                     "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}),
        caption_decoder=CaptionDecoderConfig({**_qwen2(32, 2, 2, 1, 64, vocab_size=64, max_positions=256),
                                              "initializer_range": 0.5,
                                              "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}),
        diffusion=DiffusionConfig(
            unet={
                "sample_size": 8,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "block_out_channels": [16, 32],
                "layers_per_block": 1,
                "attention_head_dim": 4,
                "norm_num_groups": 8,
                "cross_attention_dim": d,
            },
            vae={
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3,
                "block_out_channels": [8, 16, 16],
                "layers_per_block": 1,
                "latent_channels": 4,
                "norm_num_groups": 8,
                "sample_size": 32,
                "scaling_factor": 0.18215,
            },
            scheduler=_ddpm(),
            num_inference_steps=4,
        ),
        generation=GenerationConfig(max_new_tokens=12, num_beams=1),
    )


def _nano() -> VLVConfig:
    d = 128
    return VLVConfig(
        name="nano",
        encoder=EncoderConfig(
            # Three DaViT stages (stride 16): a 64 px image gives 4*4 + 1 = 17 image
            # tokens; the four-stage default would leave only 5.
            florence={
                "vision_config": _davit((32, 64, 128), (1, 1, 1), (2, 4, 4), (2, 4, 4), projection_dim=d, window_size=4),
                "text_config": _bart(d, 1, 4, 256, vocab_size=64, max_positions=128),
            },
            num_queries=16,
            image_size=64,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
            prompt="describe",
            prompt_ids=[0, 5, 2],
        ),
        bottleneck=BottleneckConfig(_clip_text(64, 2, 2, 256, vocab_size=64, max_positions=16)),
        caption_decoder=CaptionDecoderConfig(_qwen2(128, 2, 4, 2, 256, vocab_size=64, max_positions=256)),
        diffusion=DiffusionConfig(
            unet={
                "sample_size": 16,
                "in_channels": 18,  # 4 latent + 14 coordinate channels
                "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "block_out_channels": [32, 64],
                "layers_per_block": 1,
                # diffusers reads this as the number of heads: one 32-wide head per block.
                # Eight 4-wide heads (the old setting) learned colour but never position.
                "attention_head_dim": [1, 2],
                "norm_num_groups": 16,
                "cross_attention_dim": 64,
            },
            vae={
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3,
                "block_out_channels": [16, 32, 64],
                "layers_per_block": 1,
                "latent_channels": 4,
                "norm_num_groups": 16,
                "sample_size": 64,
                "scaling_factor": 1.0,
            },
            # v-prediction, unweighted: its loss is the x0 error plus the noise error, so the
            # high-noise steps that decide the layout still count. With epsilon (or min-SNR)
            # their weight is the SNR (~0.1 where the layout is set), and a teacher learned
            # colour but never position in 2,500 steps.
            scheduler={**_ddpm(), "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
            num_inference_steps=50,
            coord_channels=14,  # x, y and three Fourier octaves of each
        ),
        generation=GenerationConfig(max_new_tokens=40, num_beams=1),
    )


def _small() -> VLVConfig:
    return VLVConfig(
        name="small",
        encoder=EncoderConfig(
            florence={
                "vision_config": _davit((128, 256, 512, 1024), (1, 1, 9, 1), (4, 8, 16, 32), (4, 8, 16, 32), projection_dim=768),
                "text_config": _bart(768, 6, 12, 3072, vocab_size=51289),
            },
            num_queries=77,
            image_size=768,
            prompt=MORE_DETAILED_CAPTION,
        ),
        bottleneck=BottleneckConfig(_clip_text(768, 12, 12, 3072, vocab_size=49408, act="quick_gelu")),
        caption_decoder=CaptionDecoderConfig(_qwen2(896, 24, 14, 2, 4864, vocab_size=151936)),
        diffusion=None,
    )


def _paper() -> VLVConfig:
    return VLVConfig(
        name="paper",
        encoder=EncoderConfig(
            florence={
                "vision_config": _davit((256, 512, 1024, 2048), (1, 1, 9, 1), (8, 16, 32, 64), (8, 16, 32, 64), projection_dim=1024),
                "text_config": _bart(1024, 12, 16, 4096, vocab_size=51289),
            },
            num_queries=77,
            image_size=768,
            prompt=MORE_DETAILED_CAPTION,
        ),
        bottleneck=BottleneckConfig(_clip_text(1024, 23, 16, 4096, vocab_size=49408)),
        caption_decoder=CaptionDecoderConfig(_qwen2(2048, 36, 16, 2, 11008, vocab_size=151936)),
        diffusion=DiffusionConfig(
            unet={
                "sample_size": 64,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "block_out_channels": [320, 640, 1280, 1280],
                "layers_per_block": 2,
                "attention_head_dim": [5, 10, 20, 20],
                "cross_attention_dim": 1024,
                "use_linear_projection": True,
            },
            vae={
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4,
                "block_out_channels": [128, 256, 512, 512],
                "layers_per_block": 2,
                "latent_channels": 4,
                "sample_size": 512,
                "scaling_factor": 0.18215,
            },
            scheduler=_ddpm(),
        ),
    )


PRESETS = {"tiny": _tiny, "nano": _nano, "small": _small, "paper": _paper}


def preset(name: str) -> VLVConfig:
    """A fresh copy of a named configuration."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
