"""Building the model to train and choosing what trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlv_engine.config import PRESETS, preset
from vlv_engine.models import VLVModel


@dataclass
class TrainModel:
    model: VLVModel
    llm_tokenizer: object | None
    text_tokenizer: object | None


def build_model(init: str) -> TrainModel:
    """A preset name gives random weights; anything else is a model folder to start from."""
    if init in PRESETS:
        if init == "tiny":
            from vlv_engine.testing import tiny_model, tiny_tokenizers

            model = tiny_model()
            llm_tok, text_tok = tiny_tokenizers(model.config)
            return TrainModel(model, llm_tok, text_tok)
        return TrainModel(VLVModel.from_config(preset(init)), None, None)
    path = Path(init)
    if not path.is_dir():
        raise FileNotFoundError(f"init {init!r} is neither a preset ({sorted(PRESETS)}) nor a model folder")
    from vlv_engine.checkpoint.folder import load_folder

    loaded = load_folder(path, dtype=torch.float32)
    return TrainModel(loaded.model, loaded.llm_tokenizer, loaded.text_tokenizer)


def param_groups(model: VLVModel) -> dict[str, list[nn.Parameter]]:
    florence = model.encoder.florence
    groups = {
        "florence_vision": [*florence.vision_tower.parameters(), *florence.multi_modal_projector.parameters()],
        "florence_language": list(florence.language_model.parameters()),
        "queries": [model.encoder.query_embed],
        "language_proj": list(model.encoder.language_proj.parameters()),
        "text_encoder": list(model.bottleneck.text_encoder.parameters()),
        "caption_proj": [],
        "llm": [],
        "unet": list(model.diffusion.unet.parameters()) if model.diffusion is not None else [],
        "vae": list(model.diffusion.vae.parameters()) if model.diffusion is not None else [],
    }
    if model.caption_decoder is not None:
        groups["caption_proj"] = list(model.caption_decoder.caption_proj.parameters())
        groups["llm"] = list(model.caption_decoder.llm.parameters())
    return groups


def group_modules(model: VLVModel) -> dict[str, list[nn.Module]]:
    """The modules whose train/eval mode follows each group (dropout, drop-path)."""
    florence = model.encoder.florence
    decoder = [model.caption_decoder] if model.caption_decoder is not None else []
    diffusion = model.diffusion
    return {
        "florence_vision": [florence.vision_tower, florence.multi_modal_projector],
        "florence_language": [florence.language_model],
        "queries": [], "language_proj": [model.encoder.language_proj],
        "text_encoder": [model.bottleneck.text_encoder],
        "caption_proj": decoder, "llm": decoder,
        "unet": [diffusion.unet] if diffusion is not None else [],
        "vae": [diffusion.vae] if diffusion is not None else [],
    }


def set_train_mode(model: VLVModel, groups: list[str]) -> None:
    """Trained parts in train mode; frozen parts in eval mode, exactly as at inference."""
    model.eval()
    by_group = group_modules(model)
    for name in groups:
        for module in by_group[name]:
            module.train()


def set_trainable(model: VLVModel, groups: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze `groups`; returns the trainable (name, param) pairs
    in a fixed order (the order the optimizer state is saved in)."""
    model.requires_grad_(False)
    by_group = param_groups(model)
    for name in groups:
        if not by_group[name]:
            raise ValueError(f"trainable group {name!r} is empty in this model (no caption decoder?)")
        for p in by_group[name]:
            p.requires_grad_(True)
    # Tied weights appear once: named_parameters() deduplicates them.
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
