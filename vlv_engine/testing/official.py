"""A tiny stand-in for the official VLV release, written from a tiny random VLVModel.

`write_official_fixture` writes what a user of the release has on disk, at tiny sizes:

    florence2/          Florence-2 in its ORIGINAL remote-code layout: config.json (davit vision_config,
                        florence2_language text_config), pytorch_model.bin under the original names (a
                        "pretrained" Florence, different from the trained one), preprocessor_config.json and
                        a byte-level BPE tokenizer with BART's special tokens
    stable_diffusion/   diffusers layout: text_encoder/ (weights under `text_model.` as SD-2.1's file has
                        them), tokenizer/, unet/, vae/, scheduler/ (PNDMScheduler, as SD-2.1-base names it)
    llm/                a Qwen2 config + tokenizer, with "base" weights the loader must NOT use
    stage2/model.pt     bf16, torch.save of a flat dict under the official stage-2 prefixes
    stage1/pytorch_model.bin   fp32, stage-1 prefixes, under DeepSpeed's `module.`

The original Florence names are produced here from this file's own table (written from the left-hand
names of transformers' Florence-2 conversion script), not by inverting `vlv_engine.checkpoint.official`,
so a test of the loader against this fixture is not circular.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlv_engine.config import MORE_DETAILED_CAPTION, MORE_DETAILED_CAPTION_TEXT, VLVConfig, preset

# Image settings written to preprocessor_config.json; not the tiny preset's, so a test can see them read.
FIXTURE_MEAN = (0.48145466, 0.4578275, 0.40821073)
FIXTURE_STD = (0.26862954, 0.26130258, 0.27577711)


def florence_tokenizer():
    """A tiny byte-level BPE tokenizer with BART's specials: <s>=0 <pad>=1 </s>=2 <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([MORE_DETAILED_CAPTION_TEXT] * 4 + ["What does the image describe?"], trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))  # <s> A </s>, as BART
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=1024)


def fixture_config(vocab_size: int, prompt_ids: list[int]) -> VLVConfig:
    """The tiny preset with a Florence vocabulary that holds the BPE prompt tokens."""
    config = preset("tiny")
    config.encoder.florence["text_config"]["vocab_size"] = vocab_size
    config.encoder.prompt = MORE_DETAILED_CAPTION
    config.encoder.prompt_ids = list(prompt_ids)
    config.encoder.image_mean = FIXTURE_MEAN
    config.encoder.image_std = FIXTURE_STD
    return config


# --------------------------------------------------------------------------- original Florence-2 names

def _vision_pairs(vision: dict[str, Any]) -> list[tuple[str, str]]:
    """(original, native) names of the DaViT tower, stage by stage, as the remote code names them."""
    pairs: list[tuple[str, str]] = []
    for stage in range(len(vision["embed_dim"])):
        for w in ("weight", "bias"):
            pairs.append((f"vision_tower.convs.{stage}.proj.{w}", f"vision_tower.convs.{stage}.conv.{w}"))
            pairs.append((f"vision_tower.convs.{stage}.norm.{w}", f"vision_tower.convs.{stage}.norm.{w}"))
        for block in range(vision["depths"][stage]):
            b = f"vision_tower.blocks.{stage}.{block}"
            for w in ("weight", "bias"):
                pairs += [
                    # spatial block: conv1 -> window attention (PreNorm) -> conv2 -> FFN (PreNorm)
                    (f"{b}.spatial_block.conv1.fn.dw.{w}", f"{b}.spatial_block.conv1.{w}"),
                    (f"{b}.spatial_block.window_attn.norm.{w}", f"{b}.spatial_block.norm1.{w}"),
                    (f"{b}.spatial_block.window_attn.fn.qkv.{w}", f"{b}.spatial_block.window_attn.qkv.{w}"),
                    (f"{b}.spatial_block.window_attn.fn.proj.{w}", f"{b}.spatial_block.window_attn.proj.{w}"),
                    (f"{b}.spatial_block.conv2.fn.dw.{w}", f"{b}.spatial_block.conv2.{w}"),
                    (f"{b}.spatial_block.ffn.norm.{w}", f"{b}.spatial_block.norm2.{w}"),
                    (f"{b}.spatial_block.ffn.fn.net.fc1.{w}", f"{b}.spatial_block.ffn.fc1.{w}"),
                    (f"{b}.spatial_block.ffn.fn.net.fc2.{w}", f"{b}.spatial_block.ffn.fc2.{w}"),
                    # channel block: the same with channel (group) attention
                    (f"{b}.channel_block.conv1.fn.dw.{w}", f"{b}.channel_block.conv1.{w}"),
                    (f"{b}.channel_block.channel_attn.norm.{w}", f"{b}.channel_block.norm1.{w}"),
                    (f"{b}.channel_block.channel_attn.fn.qkv.{w}", f"{b}.channel_block.channel_attn.qkv.{w}"),
                    (f"{b}.channel_block.channel_attn.fn.proj.{w}", f"{b}.channel_block.channel_attn.proj.{w}"),
                    (f"{b}.channel_block.conv2.fn.dw.{w}", f"{b}.channel_block.conv2.{w}"),
                    (f"{b}.channel_block.ffn.norm.{w}", f"{b}.channel_block.norm2.{w}"),
                    (f"{b}.channel_block.ffn.fn.net.fc1.{w}", f"{b}.channel_block.ffn.fc1.{w}"),
                    (f"{b}.channel_block.ffn.fn.net.fc2.{w}", f"{b}.channel_block.ffn.fc2.{w}"),
                ]
    return pairs


_PROJECTOR_PAIRS = [
    ("image_proj_norm.weight", "multi_modal_projector.image_proj_norm.weight"),
    ("image_proj_norm.bias", "multi_modal_projector.image_proj_norm.bias"),
    ("image_pos_embed.row_embeddings.weight", "multi_modal_projector.image_position_embed.row_embeddings.weight"),
    ("image_pos_embed.column_embeddings.weight",
     "multi_modal_projector.image_position_embed.column_embeddings.weight"),
    ("visual_temporal_embed.pos_idx_to_embed", "multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
]


def original_florence_state_dict(florence) -> dict[str, torch.Tensor]:
    """A native Florence2Model's weights under Florence-2's remote-code names, LM head included."""
    native = {k: v.detach().clone() for k, v in florence.state_dict().items()}
    vision = florence.config.vision_config.to_dict()
    out: dict[str, torch.Tensor] = {}
    for original, name in _vision_pairs(vision) + _PROJECTOR_PAIRS:
        out[original] = native.pop(name)
    # The original projection is a bare [in, out] Parameter (x @ P).
    out["image_projection"] = native.pop("multi_modal_projector.image_projection.weight").t().contiguous()
    for name in [k for k in native if k.startswith("language_model.")]:
        out["language_model.model." + name[len("language_model."):]] = native.pop(name)
    if native:
        raise AssertionError(f"fixture table misses native Florence keys: {sorted(native)}")
    shared = out["language_model.model.shared.weight"]
    # The official stage-1 code unties the LM head (a frozen copy); BART keeps a logits bias buffer.
    out["language_model.lm_head.weight"] = shared.clone()
    out["language_model.final_logits_bias"] = torch.zeros(1, shared.shape[0])
    return out


def original_florence_config(config: VLVConfig) -> dict[str, Any]:
    """Florence-2's remote-code config.json for the fixture's sizes."""
    v = config.encoder.florence["vision_config"]
    t = config.encoder.florence["text_config"]
    text = {k: val for k, val in t.items() if k != "model_type"}
    text.update({"model_type": "florence2_language", "activation_dropout": 0.1, "attention_dropout": 0.1,
                 "add_bias_logits": False, "add_final_layer_norm": False, "normalize_before": False,
                 "no_repeat_ngram_size": 3, "num_beams": 3, "early_stopping": True, "is_encoder_decoder": True})
    return {
        "_name_or_path": "florence2",
        "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config",
                     "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration"},
        "model_type": "florence2",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "ignore_index": -100,
        "projection_dim": v["projection_dim"],
        "vocab_size": t["vocab_size"],
        "is_encoder_decoder": True,
        "torch_dtype": "float32",
        "transformers_version": "4.41.0.dev0",
        "vision_config": {
            "model_type": "davit",
            "drop_path_rate": 0.1,
            "patch_size": v["patch_size"], "patch_stride": v["patch_stride"], "patch_padding": v["patch_padding"],
            "patch_prenorm": v["patch_prenorm"],
            "enable_checkpoint": False,
            "dim_embed": v["embed_dim"],
            "num_heads": v["num_heads"], "num_groups": v["num_groups"], "depths": v["depths"],
            "window_size": v["window_size"],
            "projection_dim": v["projection_dim"],
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
        "text_config": text,
    }


def _clip_original(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP text weights as SD-2.1's text_encoder file and VLV's CustomCLIPTextModel name them."""
    sd = {f"text_model.{k}": v.detach().clone() for k, v in text_encoder.state_dict().items()}
    n = text_encoder.config.max_position_embeddings
    sd["text_model.embeddings.position_ids"] = torch.arange(n).unsqueeze(0)
    return sd


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in sd.items()}


def _bf16(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}


def bf16_rounded(model, parts=("encoder", "bottleneck", "caption_decoder")):
    """A copy of ``model`` whose ``parts`` hold bf16-rounded weights (what a bf16 model.pt gives back)."""
    out = copy.deepcopy(model)
    for part in parts:
        module = getattr(out, part)
        if module is not None:
            module.load_state_dict({k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v
                                    for k, v in module.state_dict().items()})
    return out


# --------------------------------------------------------------------------- the fixture


def write_official_fixture(tmp_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the tiny release into ``tmp_dir``.

    Returns paths (florence2, stable_diffusion, llm, stage2, stage1 (a folder), stage2_state_dict /
    stage1_state_dict (the flat dicts written)) and ``model``, ``llm_tokenizer``, ``text_tokenizer``:
    the fp32 source model and its tokenizers.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, Florence2Config, Florence2Model

    from vlv_engine.models import VLVModel
    from vlv_engine.testing.tiny import tiny_tokenizers

    root = Path(tmp_dir)
    ftok = florence_tokenizer()
    prompt_ids = ftok(MORE_DETAILED_CAPTION_TEXT).input_ids
    config = fixture_config(vocab_size=len(ftok), prompt_ids=prompt_ids)
    llm_tok, text_tok = tiny_tokenizers(config)

    torch.manual_seed(seed)
    model = VLVModel.from_config(config).eval()
    with torch.no_grad():
        model.encoder.query_embed.mul_(0.1)  # as tiny_model: image-dependent queries

    # Florence-2 folder, original layout, with "pretrained" (not VLV-trained) weights.
    florence_dir = root / "florence2"
    florence_dir.mkdir(parents=True)
    (florence_dir / "config.json").write_text(json.dumps(original_florence_config(config), indent=2))
    torch.manual_seed(seed + 1)
    base_florence = Florence2Model(Florence2Config(**config.encoder.florence))
    torch.save(original_florence_state_dict(base_florence), florence_dir / "pytorch_model.bin")
    size = config.encoder.image_size
    (florence_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "processor_class": "Florence2Processor",
        "do_resize": True, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": None, "resample": 3, "image_seq_length": (size // 8) ** 2 + 1,
        "image_mean": list(FIXTURE_MEAN), "image_std": list(FIXTURE_STD),
        "size": {"height": size, "width": size}, "crop_size": {"height": size, "width": size},
    }, indent=2))
    ftok.save_pretrained(florence_dir)

    # SD-2.1-base folder (diffusers layout).
    sd_dir = root / "stable_diffusion"
    te = model.bottleneck.text_encoder
    te.config.save_pretrained(sd_dir / "text_encoder")
    save_file({k: v.contiguous() for k, v in _clip_original(te).items()},
              str(sd_dir / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    text_tok.save_pretrained(sd_dir / "tokenizer")
    model.diffusion.unet.save_pretrained(sd_dir / "unet")
    model.diffusion.vae.save_pretrained(sd_dir / "vae")
    (sd_dir / "scheduler").mkdir()
    sched = {k: v for k, v in config.diffusion.scheduler.items() if k != "_class_name"}
    (sd_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "skip_prk_steps": True,
         "trained_betas": None, **sched}, indent=2))
    (sd_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))

    # LLM folder: config + tokenizer + base weights (stage 2 holds the trained ones).
    llm_dir = root / "llm"
    kwargs = dict(config.caption_decoder.llm)
    torch.manual_seed(seed + 2)
    base_llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
    base_llm.save_pretrained(llm_dir)
    llm_tok.save_pretrained(llm_dir)

    # The two checkpoint files, under the official prefixes.
    florence_original = original_florence_state_dict(model.encoder.florence)
    clip_original = _clip_original(te)
    lp = model.encoder.language_proj.state_dict()
    diffusion = {**_prefixed("unet.", model.diffusion.unet.state_dict()),
                 **_prefixed("vae.", model.diffusion.vae.state_dict())}
    stage2 = {
        **_prefixed("qwen2_model.", model.caption_decoder.llm.state_dict()),
        **_prefixed("VLV_model.model.", florence_original),
        **_prefixed("VLV_model.text_encoder.", clip_original),
        **_prefixed("VLV_model.language_proj.", lp),
        "VLV_model.query_embed": model.encoder.query_embed.detach().clone(),
        **_prefixed("mlp.layers.", model.caption_decoder.caption_proj.state_dict()),
        **_prefixed("VLV_model.", diffusion),
    }
    stage2 = _bf16(stage2)
    (root / "stage2").mkdir()
    torch.save(stage2, root / "stage2" / "model.pt")
    stage1 = {
        **diffusion,
        **_prefixed("text_encoder.", clip_original),
        **_prefixed("model.", florence_original),
        **_prefixed("language_proj.", lp),
        "query_embed": model.encoder.query_embed.detach().clone(),
    }
    stage1 = {f"module.{k}": v for k, v in stage1.items()}
    (root / "stage1").mkdir()
    torch.save(stage1, root / "stage1" / "pytorch_model.bin")

    return {
        "florence2": florence_dir,
        "stable_diffusion": sd_dir,
        "llm": llm_dir,
        "stage2": root / "stage2" / "model.pt",
        "stage1": root / "stage1",
        "stage2_state_dict": stage2,
        "stage1_state_dict": stage1,
        "model": model,
        "llm_tokenizer": llm_tok,
        "text_tokenizer": text_tok,
    }
