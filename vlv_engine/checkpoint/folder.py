"""Our checkpoint folder: one sub-folder per component in its library's own format.

    vlv.json             VLVConfig: components, prompt, Nq, image size, generation defaults
    adapter.safetensors  query_embed, language_proj.{0,2}.*, caption_proj.{0,2}.*
    vision/              Florence-2 (transformers Florence2Model)
    text_encoder/        CLIP text encoder (transformers CLIPTextModel)
    tokenizer/           its tokenizer (gives the unconditional prompt)
    llm/                 the caption LLM + its tokenizer
    unet/ vae/ scheduler/  diffusers components (absent in caption-only models)

Every component is loaded strictly: a missing or unexpected weight is an error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CLIPTextModel, Florence2Model, PreTrainedTokenizerBase

from vlv_engine.config import VLVConfig
from vlv_engine.models import Bottleneck, CaptionDecoder, DiffusionDecoder, VLVEncoder, VLVModel
from vlv_engine.tokenization import load_tokenizer

CONFIG_NAME = "vlv.json"
ADAPTER_NAME = "adapter.safetensors"


@dataclass
class LoadedFolder:
    model: VLVModel
    llm_tokenizer: PreTrainedTokenizerBase | None
    text_tokenizer: PreTrainedTokenizerBase | None


class CheckpointError(RuntimeError):
    """A checkpoint folder that is incomplete or does not match its config."""


def save_folder(path: str | Path, model: VLVModel, *, llm_tokenizer=None, text_tokenizer=None) -> Path:
    """Write the folder atomically: into a temp sibling, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
    try:
        model.config.save(tmp / CONFIG_NAME)
        save_file({k: v.contiguous().cpu() for k, v in model.adapter_state_dict().items()}, str(tmp / ADAPTER_NAME),
                  metadata={"format": "pt"})
        model.encoder.florence.save_pretrained(tmp / "vision")
        model.bottleneck.text_encoder.save_pretrained(tmp / "text_encoder")
        if text_tokenizer is not None:
            text_tokenizer.save_pretrained(tmp / "tokenizer")
        if model.caption_decoder is not None:
            model.caption_decoder.llm.save_pretrained(tmp / "llm")
            if llm_tokenizer is not None:
                llm_tokenizer.save_pretrained(tmp / "llm")
        if model.diffusion is not None:
            model.diffusion.unet.save_pretrained(tmp / "unet")
            model.diffusion.vae.save_pretrained(tmp / "vae")
            model.diffusion.scheduler.save_pretrained(tmp / "scheduler")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_loading_info(component: str, folder: Path, info: dict) -> None:
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
        raise CheckpointError(f"{component} weights in {folder} do not match its config: {detail}")


def _load_component(component: str, cls, folder: Path, **kwargs):
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint is missing the {component} folder {folder}")
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    _check_loading_info(component, folder, info)
    return model.eval()


def _load_hf(component: str, cls, folder: Path, dtype: torch.dtype):
    return _load_component(component, cls, folder, dtype=dtype)


def _load_diffusers(component: str, cls, folder: Path, dtype: torch.dtype):
    return _load_component(component, cls, folder, torch_dtype=dtype)


def load_folder(path: str | Path, *, dtype: torch.dtype = torch.float32, load_caption_decoder: bool = True,
                load_diffusion: bool = True) -> LoadedFolder:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from vlv_engine.models.diffusion import scheduler_from_config

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is not a vlv-engine model folder (no {CONFIG_NAME})")
    config = VLVConfig.load(path / CONFIG_NAME)

    florence = _load_hf("vision", Florence2Model, path / "vision", dtype)
    text_encoder = _load_hf("text_encoder", CLIPTextModel, path / "text_encoder", dtype)
    bottleneck = Bottleneck(text_encoder)
    encoder = VLVEncoder(florence, config.encoder, bottleneck.hidden_size).to(dtype)
    text_tokenizer = load_tokenizer(path / "tokenizer") if (path / "tokenizer").is_dir() else None

    decoder, llm_tokenizer = None, None
    if not config.caption_decoder.llm:  # an embedding-only model (e.g. a stage-1 checkpoint)
        load_caption_decoder = False
    if load_caption_decoder and (path / "llm").is_dir():
        llm = _load_hf("llm", AutoModelForCausalLM, path / "llm", dtype)
        decoder = CaptionDecoder(llm, bottleneck.hidden_size).to(dtype)
        llm_tokenizer = load_tokenizer(path / "llm")
    elif load_caption_decoder:
        raise CheckpointError(f"{path} has no llm/ folder: it cannot caption (load with load_caption_decoder=False)")

    diffusion = None
    if load_diffusion and config.diffusion is not None and (path / "unet").is_dir():
        unet = _load_diffusers("unet", UNet2DConditionModel, path / "unet", dtype)
        vae = _load_diffusers("vae", AutoencoderKL, path / "vae", torch.float32)
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        diffusion = DiffusionDecoder(unet, vae, scheduler_from_config(sched_cfg),
                                     coord_channels=config.diffusion.coord_channels)

    model = VLVModel(config, encoder, bottleneck, decoder, diffusion)
    adapter = load_file(str(path / ADAPTER_NAME))
    if decoder is None:
        adapter = {k: v for k, v in adapter.items() if not k.startswith("caption_proj.")}
    try:
        model.load_adapter_state_dict(adapter)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path / ADAPTER_NAME}: {err}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedFolder(model.eval(), llm_tokenizer, text_tokenizer)
