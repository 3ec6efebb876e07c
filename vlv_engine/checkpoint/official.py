"""Loading the official VLV release (Tiezheng11/Vision-Language-Vision) into a VLVModel.

The release is two state-dict files plus three public component folders:

    stage-2 ``model.pt``         qwen2_model.*            the caption LLM (a HF Qwen2ForCausalLM state dict)
      (bf16, torch.save)       VLV_model.model.*        all of Florence-2, ORIGINAL remote-code names
                               VLV_model.text_encoder.* CustomCLIPTextModel: text_model.{embeddings,encoder,...}
                               VLV_model.language_proj.{0,2}.*, VLV_model.query_embed
                               mlp.layers.{0,2}.*       psi (our caption_proj)
                               VLV_model.{unet,vae}.*   (the frozen diffusion decoder, when saved)
    stage-1 ``pytorch_model.bin`` (DeepSpeed, consolidated; maybe under ``module.``)
                               model.*, text_encoder.*, language_proj.*, query_embed, unet.*, vae.*
    Florence-2-large folder    config.json (remote-code layout, or transformers' native layout),
                               preprocessor_config.json, tokenizer  -> Florence2Config, image settings, prompt ids
    SD-2.1-base folder         text_encoder/ tokenizer/ unet/ vae/ scheduler/  -> configs, tokenizer, fallback weights
    Qwen2.5-3B folder          config.json + tokenizer (its weights are not read: stage 2 holds the trained ones)

Everything is done in two layers:

- pure key mapping (no I/O): `florence_original_to_native`, `clip_text_original_to_native`,
  `split_checkpoint` (one file -> components) and `split_official` (both files, with precedence).
  Every rule is a regular expression in a table; a key no rule matches is an error, never skipped.
- `load_official`: builds the VLVModel from the folders' configs, then loads every module strictly.
  All missing, unexpected and mis-shaped weights of all modules are reported in one error.

Decisions:
- Florence's LM head (``language_model.lm_head.weight``) and ``language_model.final_logits_bias`` are
  dropped: VLV never decodes tokens with Florence (its decoder runs on the learnable queries and only
  its hidden states are used; the official stage-1 code even unties lm_head from the trained
  embeddings and freezes it), and our Florence2Model has no LM head.
- The Florence vocabulary stays the original one (51289 for Florence-2-large): transformers' port adds
  an ``<image>`` token, but VLV concatenates image features in front of the prompt (as the official
  code does) and never uses image tokens. The size is taken from the checkpoint's embedding.
- Tied duplicates (BART's ``encoder/decoder.embed_tokens`` vs ``shared``, an LLM's ``lm_head`` vs its
  embeddings) must hold equal values; a tied copy absent from the file is filled from its twin.
- Derived buffers are checked or dropped, not loaded: CLIP's ``position_ids`` (must be 0..n-1) and
  rotary ``inv_freq`` buffers (recomputed from the config).
- Weight precedence: Florence, text encoder, queries and phi from stage 2, else stage 1 (else, for
  the frozen text encoder only, the SD folder); the LLM and psi from stage 2 only; the frozen UNet and
  VAE from stage 1, else the SD folder (full precision), else stage 2's bf16 copies.
- The scheduler is a DDPMScheduler built from the SD folder's scheduler config, as the official code
  does (SD-2.1-base's folder names PNDMScheduler); guidance 2.0, 50 steps.
- Every pickle file is read by `load_state_dict_file` (weights only): nothing in a checkpoint runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from vlv_engine.checkpoint.folder import CheckpointError, LoadedFolder, save_folder
from vlv_engine.checkpoint.safe_load import load_state_dict_file
from vlv_engine.config import (
    MORE_DETAILED_CAPTION,
    MORE_DETAILED_CAPTION_TEXT,
    BottleneckConfig,
    CaptionDecoderConfig,
    DiffusionConfig,
    EncoderConfig,
    GenerationConfig,
    VLVConfig,
)
from vlv_engine.tokenization import load_tokenizer

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

OFFICIAL_GENERATION = GenerationConfig(max_new_tokens=300, num_beams=4, early_stopping=True, postprocess=True)
OFFICIAL_GUIDANCE_SCALE = 2.0
OFFICIAL_STEPS = 50


class OfficialCheckpointError(CheckpointError):
    """The official checkpoint or a component folder does not have the expected layout."""


def _describe(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {shown}{more}"


# --------------------------------------------------------------------------- rule tables


@dataclass(frozen=True)
class Rule:
    """A key matching ``pattern`` (whole key) becomes ``target`` (a `re` template); None drops it."""

    pattern: re.Pattern
    target: str | None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _rule(pattern: str, target: str | None, transform=None) -> Rule:
    return Rule(re.compile(pattern), target, transform)


def _transpose(t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise OfficialCheckpointError(f"image_projection should be a matrix, got shape {tuple(t.shape)}")
    return t.t().contiguous()


def apply_rules(sd: Mapping[str, torch.Tensor], rules: Iterable[Rule], what: str) -> tuple[StateDict, list[str]]:
    """Rename every key by the first rule that matches it -> (renamed, dropped keys).

    A key that no rule matches, or two keys that land on one name, raise OfficialCheckpointError."""
    rules = tuple(rules)
    out: StateDict = {}
    dropped: list[str] = []
    unmatched: list[str] = []
    for key, value in sd.items():
        for rule in rules:
            match = rule.pattern.fullmatch(key)
            if match:
                break
        else:
            unmatched.append(key)
            continue
        if rule.target is None:
            dropped.append(key)
            continue
        new = match.expand(rule.target)
        if new in out:
            raise OfficialCheckpointError(f"{what}: more than one key maps to {new!r}")
        out[new] = rule.transform(value) if rule.transform else value
    if unmatched:
        raise OfficialCheckpointError(f"{what}: {_describe(unmatched)} match no known name")
    return out, dropped


_WB = r"(weight|bias)"
_BLOCK = r"vision_tower\.blocks\.(\d+)\.(\d+)\."  # stage, block within the stage
_NATIVE_BLOCK = r"vision_tower.blocks.\1.\2."

# Florence-2 remote-code names -> transformers' native Florence2Model names. The original DaViT wraps
# each sub-layer in PreNorm/residual helpers (`.fn`, `.fn.dw`, `.fn.net`) and keeps the pre-norm inside
# the attention/FFN wrapper; the port flattens them into norm1/norm2.
FLORENCE_RULES: tuple[Rule, ...] = (
    # DaViT patch embeddings, one per stage.
    _rule(rf"vision_tower\.convs\.(\d+)\.proj\.{_WB}", r"vision_tower.convs.\1.conv.\2"),
    _rule(rf"vision_tower\.convs\.(\d+)\.norm\.{_WB}", r"vision_tower.convs.\1.norm.\2"),
    # Depth-wise convolutions before attention (conv1) and before the FFN (conv2), both block kinds.
    _rule(rf"{_BLOCK}(spatial|channel)_block\.conv([12])\.fn\.dw\.{_WB}", _NATIVE_BLOCK + r"\3_block.conv\4.\5"),
    # Spatial block: window attention.
    _rule(rf"{_BLOCK}spatial_block\.window_attn\.norm\.{_WB}", _NATIVE_BLOCK + r"spatial_block.norm1.\3"),
    _rule(rf"{_BLOCK}spatial_block\.window_attn\.fn\.(qkv|proj)\.{_WB}",
          _NATIVE_BLOCK + r"spatial_block.window_attn.\3.\4"),
    # Channel block: channel (group) attention.
    _rule(rf"{_BLOCK}channel_block\.channel_attn\.norm\.{_WB}", _NATIVE_BLOCK + r"channel_block.norm1.\3"),
    _rule(rf"{_BLOCK}channel_block\.channel_attn\.fn\.(qkv|proj)\.{_WB}",
          _NATIVE_BLOCK + r"channel_block.channel_attn.\3.\4"),
    # FFN of both block kinds.
    _rule(rf"{_BLOCK}(spatial|channel)_block\.ffn\.norm\.{_WB}", _NATIVE_BLOCK + r"\3_block.norm2.\4"),
    _rule(rf"{_BLOCK}(spatial|channel)_block\.ffn\.fn\.net\.(fc[12])\.{_WB}", _NATIVE_BLOCK + r"\3_block.ffn.\4.\5"),
    # Image projection: a bare [in, out] Parameter used as `x @ P`; the port has Linear.weight [out, in].
    _rule(r"image_projection", "multi_modal_projector.image_projection.weight", _transpose),
    _rule(rf"image_proj_norm\.{_WB}", r"multi_modal_projector.image_proj_norm.\1"),
    _rule(r"image_pos_embed\.(row|column)_embeddings\.weight",
          r"multi_modal_projector.image_position_embed.\1_embeddings.weight"),
    _rule(r"visual_temporal_embed\.pos_idx_to_embed", "multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    # The BART language model: Florence2LanguageForConditionalGeneration.model -> BartModel.
    _rule(r"language_model\.model\.(shared\.weight|(?:encoder|decoder)\..+)", r"language_model.\1"),
    # No place in Florence2Model, and unused by VLV (see the module docstring): dropped on purpose.
    _rule(r"language_model\.lm_head\.weight", None),
    _rule(r"language_model\.final_logits_bias", None),
)

# Florence keys that are tied to `language_model.shared.weight` in both the original and the port.
FLORENCE_TIED_TO_SHARED = ("language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight")

# The official CustomCLIPTextModel wraps the transformer in `.text_model`; transformers 5's
# CLIPTextModel has no such level. Already-native names are accepted as they are.
_CLIP_PARTS = r"(?:embeddings\.(?:token_embedding|position_embedding)\.weight|encoder\.layers\..+|final_layer_norm\..+)"
CLIP_TEXT_RULES: tuple[Rule, ...] = (
    _rule(r"(?:text_model\.)?embeddings\.position_ids", None),  # derived buffer, checked separately
    _rule(rf"text_model\.({_CLIP_PARTS})", r"\1"),
    _rule(rf"({_CLIP_PARTS})", r"\1"),
)

# A causal LM's state dict is taken as is; rotary frequencies are recomputed from the config.
LLM_RULES: tuple[Rule, ...] = (
    _rule(r"(?:.+\.)?rotary_emb\.inv_freq", None),
    _rule(r"(.+)", r"\1"),
)

_PASS = r"(.+)"

# Official key -> (component, key inside the component). Components: florence and text_encoder still in
# their original names (mapped afterwards), encoder_adapter / caption_proj in our adapter names.
STAGE2_LAYOUT: tuple[tuple[str, Rule], ...] = (
    ("llm", _rule(r"qwen2_model\.(.+)", r"\1")),
    ("florence", _rule(r"VLV_model\.model\.(.+)", r"\1")),
    ("text_encoder", _rule(r"VLV_model\.text_encoder\.(.+)", r"\1")),
    ("encoder_adapter", _rule(r"VLV_model\.query_embed", "query_embed")),
    ("encoder_adapter", _rule(rf"VLV_model\.language_proj\.([02])\.{_WB}", r"language_proj.\1.\2")),
    ("caption_proj", _rule(rf"mlp\.layers\.([02])\.{_WB}", r"caption_proj.\1.\2")),
    ("unet", _rule(r"VLV_model\.unet\.(.+)", r"\1")),
    ("vae", _rule(r"VLV_model\.vae\.(.+)", r"\1")),
)
STAGE1_LAYOUT: tuple[tuple[str, Rule], ...] = (
    ("florence", _rule(r"model\.(.+)", r"\1")),
    ("text_encoder", _rule(r"text_encoder\.(.+)", r"\1")),
    ("encoder_adapter", _rule(r"query_embed", "query_embed")),
    ("encoder_adapter", _rule(rf"language_proj\.([02])\.{_WB}", r"language_proj.\1.\2")),
    ("unet", _rule(r"unet\.(.+)", r"\1")),
    ("vae", _rule(r"vae\.(.+)", r"\1")),
)
LAYOUTS = {"stage2": STAGE2_LAYOUT, "stage1": STAGE1_LAYOUT}
COMPONENTS = ("florence", "text_encoder", "adapter", "llm", "unet", "vae")


# --------------------------------------------------------------------------- pure mapping


def florence_original_to_native(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """Florence-2 remote-code state dict -> (transformers Florence2Model state dict, dropped keys)."""
    native, dropped = apply_rules(sd, FLORENCE_RULES, "Florence-2 weights")
    shared = native.get("language_model.shared.weight")
    for key in FLORENCE_TIED_TO_SHARED:
        if key in native and shared is not None and not (
                native[key].shape == shared.shape and torch.equal(native[key], shared)):
            raise OfficialCheckpointError(
                f"Florence-2 weights: {key} differs from language_model.shared.weight, but the two are one "
                f"tied parameter in Florence-2 (this checkpoint was not saved from the official layout)")
    return native, dropped


def clip_text_original_to_native(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """CustomCLIPTextModel / SD ``text_model.``-prefixed names -> transformers 5 CLIPTextModel names."""
    for key in ("text_model.embeddings.position_ids", "embeddings.position_ids"):
        if key in sd:
            ids = sd[key]
            expected = torch.arange(ids.shape[-1]).expand(ids.shape)
            if ids.is_floating_point() or not torch.equal(ids.long(), expected):
                raise OfficialCheckpointError(f"CLIP text encoder: {key} is not 0..{ids.shape[-1] - 1}")
    native, _ = apply_rules(sd, CLIP_TEXT_RULES, "CLIP text encoder weights")
    return native


def llm_to_native(sd: Mapping[str, torch.Tensor]) -> StateDict:
    native, _ = apply_rules(sd, LLM_RULES, "LLM weights")
    return native


def _strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DeepSpeed/DDP wrappers save under `module.`; only a leading one is removed.
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def split_checkpoint(sd: Mapping[str, torch.Tensor], stage: str) -> dict[str, StateDict]:
    """One official file -> {component: state dict in our names}.

    Components: florence (native Florence2Model names), text_encoder (CLIPTextModel names), llm,
    encoder_adapter (query_embed, language_proj.*), caption_proj (caption_proj.*), unet, vae.
    Only components with at least one key appear.
    """
    if stage not in LAYOUTS:
        raise ValueError(f"stage must be one of {sorted(LAYOUTS)}, not {stage!r}")
    sd = _strip_module_prefix(sd)
    parts: dict[str, StateDict] = defaultdict(dict)
    unmatched = []
    for key, value in sd.items():
        for component, rule in LAYOUTS[stage]:
            match = rule.pattern.fullmatch(key)
            if match:
                parts[component][match.expand(rule.target)] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        hint = ""
        other = "stage1" if stage == "stage2" else "stage2"
        if all(any(r.pattern.fullmatch(k) for _, r in LAYOUTS[other]) for k in unmatched):
            hint = f" (these are {other.replace('stage', 'stage-')} names: were the two files swapped?)"
        raise OfficialCheckpointError(
            f"{stage.replace('stage', 'stage-')} checkpoint: {_describe(unmatched)} match no known prefix{hint}")
    if "florence" in parts:
        parts["florence"], dropped = florence_original_to_native(parts["florence"])
        if dropped:
            log.info("dropped Florence-2 weights VLV does not use: %s", ", ".join(dropped))
    if "text_encoder" in parts:
        parts["text_encoder"] = clip_text_original_to_native(parts["text_encoder"])
    if "llm" in parts:
        parts["llm"] = llm_to_native(parts["llm"])
    return dict(parts)


def _first(component: str, *splits: Mapping[str, StateDict]) -> StateDict:
    return next((s[component] for s in splits if s.get(component)), {})


def split_official(stage2: Mapping[str, torch.Tensor] | None,
                   stage1: Mapping[str, torch.Tensor] | None) -> dict[str, StateDict]:
    """Both official files -> {florence, text_encoder, adapter, llm, unet, vae} in our names.

    Precedence: florence, text_encoder and the encoder half of the adapter (query_embed,
    language_proj) from stage 2, else stage 1; llm and caption_proj from stage 2 only; unet and vae
    from stage 1, else stage 2. A component neither file holds is an empty dict.
    """
    s2 = split_checkpoint(stage2, "stage2") if stage2 is not None else {}
    s1 = split_checkpoint(stage1, "stage1") if stage1 is not None else {}
    return _merge_splits(s2, s1)


def _merge_splits(s2: Mapping[str, StateDict], s1: Mapping[str, StateDict]) -> dict[str, StateDict]:
    return {
        "florence": _first("florence", s2, s1),
        "text_encoder": _first("text_encoder", s2, s1),
        "adapter": {**_first("encoder_adapter", s2, s1), **s2.get("caption_proj", {})},
        "llm": s2.get("llm", {}),
        "unet": _first("unet", s1, s2),
        "vae": _first("vae", s1, s2),
    }


# --------------------------------------------------------------------------- configs

_REQUIRED_VISION = ("dim_embed", "depths", "num_heads", "num_groups", "patch_size", "patch_stride", "patch_padding",
                    "patch_prenorm", "window_size")
_REQUIRED_TEXT = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                  "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")
_OPTIONAL_TEXT = ("encoder_layerdrop", "decoder_layerdrop", "activation_function", "dropout", "attention_dropout",
                  "activation_dropout", "init_std", "classifier_dropout", "scale_embedding", "pad_token_id",
                  "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id",
                  "forced_bos_token_id")
# What transformers' native port implements of the original's options.
_SUPPORTED_VISION = {
    ("image_pos_embed", "type"): "learned_abs_2d",
    ("visual_temporal_embedding", "type"): "COSINE",
}
_SUPPORTED_FEATURE_SOURCE = ["spatial_avg_pool", "temporal_avg_pool"]
# Bookkeeping keys of saved configs that are not architecture.
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "auto_map",
                 "_commit_hash", "_attn_implementation_autoset", "use_cache"}


def florence_config_from_original(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """Florence-2 remote-code config.json -> Florence2Config kwargs {vision_config, text_config}."""
    vc = config_json.get("vision_config") or {}
    tc = config_json.get("text_config") or {}
    missing = [f"vision_config.{k}" for k in _REQUIRED_VISION if k not in vc]
    missing += [f"text_config.{k}" for k in _REQUIRED_TEXT if k not in tc]
    projection_dim = vc.get("projection_dim", config_json.get("projection_dim"))
    if projection_dim is None:
        missing.append("vision_config.projection_dim")
    for section in ("image_pos_embed", "visual_temporal_embedding"):
        if not isinstance(vc.get(section), Mapping):
            missing.append(f"vision_config.{section}")
    if missing:
        raise OfficialCheckpointError(f"Florence-2 config.json lacks {', '.join(missing)}")
    for (section, field), want in _SUPPORTED_VISION.items():
        if vc[section].get(field) != want:
            raise OfficialCheckpointError(f"Florence-2 config: vision_config.{section}.{field} is "
                                          f"{vc[section].get(field)!r}; only {want!r} is supported")
    source = list(vc.get("image_feature_source", _SUPPORTED_FEATURE_SOURCE))
    if source != _SUPPORTED_FEATURE_SOURCE:
        raise OfficialCheckpointError(f"Florence-2 config: image_feature_source {source} is not supported "
                                      f"(only {_SUPPORTED_FEATURE_SOURCE})")
    vision = {
        "embed_dim": list(vc["dim_embed"]),
        **{k: (list(vc[k]) if isinstance(vc[k], (list, tuple)) else vc[k]) for k in _REQUIRED_VISION[1:]},
        "projection_dim": projection_dim,
        "drop_path_rate": vc.get("drop_path_rate", 0.1),
        "max_position_embeddings": vc["image_pos_embed"]["max_pos_embeddings"],
        "max_temporal_embeddings": vc["visual_temporal_embedding"]["max_temporal_embeddings"],
    }
    text = {"model_type": "bart", **{k: tc[k] for k in _REQUIRED_TEXT}}
    text.update({k: tc[k] for k in _OPTIONAL_TEXT if k in tc})
    _check_florence_dims(vision, text)
    return {"vision_config": vision, "text_config": text}


def _florence_config_from_native(config_json: Mapping[str, Any]) -> dict[str, Any]:
    vision = {k: v for k, v in config_json["vision_config"].items() if k not in _CONFIG_NOISE and k != "model_type"}
    text = {k: v for k, v in config_json["text_config"].items() if k not in _CONFIG_NOISE}
    text["model_type"] = "bart"
    _check_florence_dims(vision, text)
    return {"vision_config": vision, "text_config": text}


def _check_florence_dims(vision: Mapping[str, Any], text: Mapping[str, Any]) -> None:
    if vision.get("projection_dim") != text.get("d_model"):
        raise OfficialCheckpointError(f"Florence-2 config: projection_dim {vision.get('projection_dim')} must equal "
                                      f"the language model's d_model {text.get('d_model')}")


def florence_config_from_json(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """Either layout: the original (vision_config.dim_embed) or transformers' native (embed_dim)."""
    vc = config_json.get("vision_config") or {}
    if "dim_embed" in vc:
        return florence_config_from_original(config_json)
    if "embed_dim" in vc:
        return _florence_config_from_native(config_json)
    raise OfficialCheckpointError("Florence-2 config.json has neither vision_config.dim_embed (original layout) "
                                  "nor vision_config.embed_dim (transformers layout)")


@dataclass(frozen=True)
class ImageSettings:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _edge(value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise OfficialCheckpointError(f"preprocessor_config.json: {what} {dict(value)} is not square")
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    raise OfficialCheckpointError(f"preprocessor_config.json: cannot read {what} {value!r}")


def image_settings_from_preprocessor(config: Mapping[str, Any]) -> ImageSettings:
    """Input size, mean and std from Florence-2's preprocessor_config.json."""
    if config.get("do_center_crop") and "crop_size" in config:
        size = _edge(config["crop_size"], "crop_size")
    elif "size" in config:
        size = _edge(config["size"], "size")
    else:
        raise OfficialCheckpointError("preprocessor_config.json has no size")
    rescale = config.get("rescale_factor", 1 / 255)
    if config.get("do_rescale", True) and abs(rescale - 1 / 255) > 1e-9:
        raise OfficialCheckpointError(f"preprocessor_config.json: rescale_factor {rescale} is not 1/255")
    if config.get("do_normalize", True):
        mean, std = config.get("image_mean"), config.get("image_std")
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise OfficialCheckpointError("preprocessor_config.json needs 3-channel image_mean and image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ImageSettings(size, tuple(float(x) for x in mean), tuple(float(x) for x in std))


def prompt_ids_for(tokenizer) -> list[int]:
    """Token ids of `<MORE_DETAILED_CAPTION>` as Florence-2's processor gives them.

    The processor replaces the task token with a sentence and tokenizes it with special tokens
    (BART: ``<s> ... </s>``)."""
    ids = list(tokenizer(MORE_DETAILED_CAPTION_TEXT).input_ids)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


def _clean_config(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _CONFIG_NOISE}


# --------------------------------------------------------------------------- files and folders

_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_STAGE_FILES = {"stage2": ("model.pt", "pytorch_model.bin", "model.safetensors"),
                "stage1": ("pytorch_model.bin", "model.safetensors", "model.pt")}


def _read_weights(folder: Path, names: Iterable[str]) -> StateDict | None:
    """The first of ``names`` present in ``folder`` (or its sharded ``.index.json``); None if none is."""
    for name in names:
        if (folder / name).is_file():
            return load_state_dict_file(folder / name)
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                path = (folder / shard).resolve()
                if path.parent != folder.resolve():
                    raise OfficialCheckpointError(f"{index}: shard {shard!r} lies outside the folder")
                sd.update(load_state_dict_file(path))
            return sd
    return None


def _read_stage(path: str | Path, stage: str) -> StateDict:
    path = Path(path)
    if path.is_dir():
        sd = _read_weights(path, _STAGE_FILES[stage])
        if sd is None:
            hint = (" It looks like an unconsolidated DeepSpeed folder: run its zero_to_fp32.py first."
                    if (path / "latest").exists() or any(path.glob("global_step*")) else "")
            raise OfficialCheckpointError(f"no {stage.replace('stage', 'stage-')} weights in {path} "
                                          f"(looked for {', '.join(_STAGE_FILES[stage])}).{hint}")
        return sd
    return load_state_dict_file(path)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise OfficialCheckpointError(f"{what}: {path} not found")
    return json.loads(path.read_text())


def _florence_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    try:
        return load_tokenizer(folder)
    except Exception as err:  # noqa: BLE001 - the remote-code config can confuse AutoTokenizer
        if (folder / "tokenizer.json").is_file():
            log.info("AutoTokenizer failed on %s (%s); reading tokenizer.json directly", folder, err)
            return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                           eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        raise OfficialCheckpointError(f"cannot load the Florence-2 tokenizer from {folder}: {err}") from err


def _diffusers_init_dict(cls, config: Mapping[str, Any]) -> dict[str, Any]:
    init, _, _ = cls.extract_init_dict(dict(config))
    return json.loads(json.dumps(init))  # tuples -> lists: a plain JSON-able dict


# --------------------------------------------------------------------------- strict loading


def _fill_tied(module: torch.nn.Module, sd: StateDict, component: str, problems: list[str]) -> StateDict:
    """Tied parameters: present copies must be equal; an absent copy is filled from its twin."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, param in module.named_parameters(remove_duplicate=False):
        groups[id(param)].append(name)
    sd = dict(sd)
    for names in groups.values():
        present = [n for n in names if n in sd]
        if len(names) < 2 or not present:
            continue
        ref = sd[present[0]]
        for other in present[1:]:
            if sd[other].shape != ref.shape or not torch.equal(sd[other], ref):
                problems.append(f"{component}: tied weights {present[0]} and {other} differ")
        for name in names:
            sd.setdefault(name, ref)
    return sd


def _key_problems(component: str, expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> list[str]:
    problems = []
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing:
        problems.append(f"{component}: missing {_describe(missing)}")
    if unexpected:
        problems.append(f"{component}: unexpected {_describe(unexpected)}")
    shapes = [f"{k} {tuple(sd[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if shapes:
        problems.append(f"{component}: wrong shape for " + "; ".join(shapes[:20])
                        + (f" ... ({len(shapes) - 20} more)" if len(shapes) > 20 else ""))
    return problems


# --------------------------------------------------------------------------- load / convert


def load_official(*, stage2: str | Path | None = None, stage1: str | Path | None = None,
                  florence2: str | Path, stable_diffusion: str | Path | None = None, llm: str | Path | None = None,
                  num_queries: int | None = None, dtype: torch.dtype = torch.float32) -> LoadedFolder:
    """Build a VLVModel from the official release.

    ``stage2``: the stage-2 ``model.pt`` (or its folder): encoder + caption decoder.
    ``stage1``: the consolidated stage-1 ``pytorch_model.bin`` (or its folder): encoder + diffusion.
    ``florence2``, ``stable_diffusion``, ``llm``: the public component folders (configs, tokenizers,
    fallback weights of the frozen SD parts). ``llm`` is required with ``stage2``; without stage 2 the
    model has no caption decoder (embed and reconstruct only). ``num_queries``, if given, must match
    the checkpoint's. ``dtype``: of every module but the VAE (fp32, as the official decoder runs it).
    """
    if stage2 is None and stage1 is None:
        raise OfficialCheckpointError("give the stage-2 model.pt, the stage-1 checkpoint, or both")
    if stable_diffusion is None:
        raise OfficialCheckpointError("the SD-2.1-base folder (stable_diffusion) is required: the text encoder's "
                                      "config and tokenizer, and the UNet/VAE configs, come from it")
    if stage2 is not None and llm is None:
        raise OfficialCheckpointError("stage 2 needs the LLM folder (llm): its config and tokenizer")
    if stage2 is None and llm is not None:
        log.info("no stage-2 checkpoint: the LLM folder %s is not used (no caption decoder)", llm)
        llm = None

    # 1. The checkpoint files, split into components (pure mapping: unknown keys raise here).
    s2 = split_checkpoint(_read_stage(stage2, "stage2"), "stage2") if stage2 is not None else {}
    s1 = split_checkpoint(_read_stage(stage1, "stage1"), "stage1") if stage1 is not None else {}
    weights = _merge_splits(s2, s1)
    if not weights["florence"]:
        raise OfficialCheckpointError("no Florence-2 weights (VLV_model.model.* / model.*) in the checkpoint(s)")
    if "query_embed" not in weights["adapter"]:
        raise OfficialCheckpointError("no query_embed (VLV_model.query_embed / query_embed) in the checkpoint(s)")
    if stage2 is not None and not weights["llm"]:
        raise OfficialCheckpointError(f"{stage2}: no qwen2_model.* weights: this is not a stage-2 checkpoint")

    # 2. The configuration, from the component folders and the checkpoint's shapes.
    config, text_tokenizer, llm_tokenizer = _official_config(
        Path(florence2), Path(stable_diffusion), llm and Path(llm), weights, num_queries)

    # 3. The model, uninitialized: every weight is loaded below, strictly.
    model = _empty_model(config, dtype)

    # 4. Which weights go where, then one strict check of everything before loading.
    modules, sources = _weights_for_modules(model, s2, s1, weights, Path(stable_diffusion))
    adapter = dict(weights["adapter"])
    if model.caption_decoder is None:
        adapter = {k: v for k, v in adapter.items() if not k.startswith("caption_proj.")}
    given = ", ".join(f"{n}={p}" for n, p in (("stage2", stage2), ("stage1", stage1)) if p is not None)
    _load_strictly(model, modules, adapter, given)
    log.info("official weights: %s", ", ".join(f"{k} from {v}" for k, v in sources.items()))
    return LoadedFolder(model.eval(), llm_tokenizer, text_tokenizer)


def _official_config(florence_dir: Path, sd_dir: Path, llm_dir: Path | None, weights: Mapping[str, StateDict],
                     num_queries: int | None):
    """-> (VLVConfig named "official", text tokenizer, LLM tokenizer or None)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoConfig, CLIPTextConfig

    # Florence-2: architecture, image settings, and the task prompt's token ids.
    florence = florence_config_from_json(_read_json(florence_dir / "config.json", "Florence-2 folder"))
    shared = weights["florence"].get("language_model.shared.weight")
    if shared is not None:
        # The checkpoint's vocabulary wins: a transformers-layout folder has one more (<image>) token.
        florence["text_config"]["vocab_size"] = int(shared.shape[0])
    image = image_settings_from_preprocessor(_read_json(florence_dir / "preprocessor_config.json",
                                                        "Florence-2 folder"))
    prompt_ids = prompt_ids_for(_florence_tokenizer(florence_dir))
    vocab = florence["text_config"]["vocab_size"]
    if max(prompt_ids) >= vocab:
        raise OfficialCheckpointError(f"the Florence-2 tokenizer gives id {max(prompt_ids)} for the prompt, outside "
                                      f"the model's vocabulary of {vocab}")
    query_embed = weights["adapter"]["query_embed"]
    if query_embed.dim() != 3 or query_embed.shape[0] != 1:
        raise OfficialCheckpointError(f"query_embed should be [1, Nq, d], got {tuple(query_embed.shape)}")
    nq = int(query_embed.shape[1])
    if num_queries is not None and num_queries != nq:
        raise OfficialCheckpointError(f"num_queries={num_queries} but the checkpoint's query_embed has {nq}")

    # The CLIP text encoder and its tokenizer (for the unconditional prompt) from the SD folder.
    clip = _clean_config(CLIPTextConfig.from_pretrained(sd_dir / "text_encoder").to_dict())
    text_tokenizer = load_tokenizer(sd_dir / "tokenizer")

    # The LLM. Without one (no stage 2) the config says so with an empty dict.
    llm: dict[str, Any] = {}
    llm_tokenizer = None
    if llm_dir is not None:
        llm = _clean_config(AutoConfig.from_pretrained(llm_dir).to_dict())
        llm_tokenizer = load_tokenizer(llm_dir)

    diffusion = None
    if all((sd_dir / sub).is_dir() for sub in ("unet", "vae", "scheduler")):
        scheduler = _diffusers_init_dict(DDPMScheduler, _read_json(sd_dir / "scheduler" / "scheduler_config.json",
                                                                   "SD folder"))
        diffusion = DiffusionConfig(
            unet=_diffusers_init_dict(UNet2DConditionModel, UNet2DConditionModel.load_config(sd_dir / "unet")),
            vae=_diffusers_init_dict(AutoencoderKL, AutoencoderKL.load_config(sd_dir / "vae")),
            # The official code samples and trains with DDPM, whatever class the SD folder names.
            scheduler={"_class_name": "DDPMScheduler", **scheduler},
            guidance_scale=OFFICIAL_GUIDANCE_SCALE,
            num_inference_steps=OFFICIAL_STEPS,
        )
    else:
        log.info("%s has no unet/vae/scheduler folders: the model will not reconstruct images", sd_dir)

    config = VLVConfig(
        name="official",
        encoder=EncoderConfig(florence=florence, num_queries=nq, image_size=image.size, image_mean=image.mean,
                              image_std=image.std, prompt=MORE_DETAILED_CAPTION, prompt_ids=prompt_ids),
        bottleneck=BottleneckConfig(clip),
        caption_decoder=CaptionDecoderConfig(llm),
        diffusion=diffusion,
        generation=dataclasses.replace(OFFICIAL_GENERATION),
    )
    return config, text_tokenizer, llm_tokenizer


def _empty_model(config: VLVConfig, dtype: torch.dtype):
    """The VLVModel of ``config`` without random initialization (the weights are loaded next)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, CLIPTextConfig, CLIPTextModel, Florence2Config,
                              Florence2Model)
    from transformers.initialization import no_init_weights

    from vlv_engine.models import Bottleneck, CaptionDecoder, DiffusionDecoder, VLVEncoder, VLVModel

    with no_init_weights():
        florence = Florence2Model(Florence2Config(**config.encoder.florence))
        bottleneck = Bottleneck(CLIPTextModel(CLIPTextConfig(**config.bottleneck.text_encoder)))
        decoder = None
        if config.caption_decoder.llm:
            kwargs = dict(config.caption_decoder.llm)
            llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
            decoder = CaptionDecoder(llm, bottleneck.hidden_size)
        diffusion = DiffusionDecoder.from_config(config.diffusion) if config.diffusion is not None else None
    # no_init_weights also skips transformers' weight tying: tie now, so tied copies share one tensor.
    for hf_model in (florence, bottleneck.text_encoder, decoder and decoder.llm):
        if hf_model is not None:
            hf_model.tie_weights()
    model = VLVModel(config, VLVEncoder(florence, config.encoder, bottleneck.hidden_size), bottleneck, decoder,
                     diffusion)
    for module, want in ((model.encoder, dtype), (model.bottleneck, dtype), (decoder, dtype),
                         (diffusion and diffusion.unet, dtype),
                         (diffusion and diffusion.vae, torch.float32)):  # the official decoder runs the VAE in fp32
        # Cast only when needed: diffusers warns on every cast, even a no-op one.
        if module is not None and any(p.dtype != want for p in module.parameters()):
            module.to(want)
    return model


def _weights_for_modules(model, s2: Mapping[str, StateDict], s1: Mapping[str, StateDict],
                         weights: Mapping[str, StateDict], sd_dir: Path):
    """-> ({component: (module, state dict)}, {component: where its weights come from})."""
    sources = {c: next((name for name, s in (("stage2", s2), ("stage1", s1)) if s.get(c)), "none")
               for c in ("florence", "encoder_adapter", "text_encoder")}
    text_sd = weights["text_encoder"]
    if not text_sd:  # frozen: the SD folder's copy is the same
        sources["text_encoder"] = str(sd_dir / "text_encoder")
        text_sd = _folder_weights(sd_dir / "text_encoder", _TRANSFORMERS_WEIGHTS, clip_text_original_to_native)
    modules: dict[str, tuple[torch.nn.Module, StateDict]] = {
        "florence": (model.encoder.florence, weights["florence"]),
        "text_encoder": (model.bottleneck.text_encoder, text_sd),
    }
    if model.caption_decoder is not None:
        modules["llm"] = (model.caption_decoder.llm, weights["llm"])
    if model.diffusion is not None:
        for part in ("unet", "vae"):
            module = getattr(model.diffusion, part)
            # Frozen: stage 1 (fp32), else the SD folder (full precision), else stage 2's bf16 copy.
            if s1.get(part):
                sd, sources[part] = s1[part], "stage1"
            else:
                sd = _folder_weights(sd_dir / part, _DIFFUSERS_WEIGHTS, None, required=not s2.get(part))
                sd, sources[part] = (sd, str(sd_dir / part)) if sd is not None else (s2[part], "stage2")
            if hasattr(module, "_fix_state_dict_keys_on_load"):
                sd = module._fix_state_dict_keys_on_load(dict(sd))  # pre-0.14 diffusers attention names
            modules[part] = (module, sd)
    return modules, sources


def _load_strictly(model, modules: dict[str, tuple[torch.nn.Module, StateDict]], adapter: StateDict,
                   given: str) -> None:
    """Check every module's keys and shapes, raise one error listing every problem, then load."""
    problems: list[str] = []
    for component, (module, sd) in list(modules.items()):
        sd = _fill_tied(module, sd, component, problems)
        modules[component] = (module, sd)
        problems += _key_problems(component, module.state_dict(), sd)
    problems += _key_problems("adapter", model.adapter_state_dict(), adapter)
    if problems:
        raise OfficialCheckpointError(f"the official checkpoint ({given}) does not match the model built from the "
                                      "component folders:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for module, sd in modules.values():
            module.load_state_dict(sd, strict=True)
        model.load_adapter_state_dict(adapter)
    for p in model.parameters():
        p.requires_grad_(False)


def _folder_weights(folder: Path, names: tuple[str, ...], mapping, required: bool = True) -> StateDict | None:
    sd = _read_weights(folder, names) if folder.is_dir() else None
    if sd is None:
        if required:
            raise OfficialCheckpointError(f"the checkpoint has no weights for {folder.name} and {folder} has none "
                                          f"either (looked for {', '.join(names)})")
        return None
    return mapping(sd) if mapping else sd


def convert_official(out_dir: str | Path, **kwargs: Any) -> Path:
    """`load_official(**kwargs)`, then write our model folder (what `vlv convert` runs)."""
    loaded = load_official(**kwargs)
    return save_folder(out_dir, loaded.model, llm_tokenizer=loaded.llm_tokenizer,
                       text_tokenizer=loaded.text_tokenizer)
