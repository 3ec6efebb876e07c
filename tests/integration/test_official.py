"""Loading the official VLV release layout, on a tiny stand-in (vlv_engine.testing.official)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from vlv_engine import Engine
from vlv_engine.checkpoint.official import (
    OfficialCheckpointError,
    convert_official,
    florence_original_to_native,
    load_official,
    split_official,
)
from vlv_engine.checkpoint.safe_load import UnsafeCheckpointError
from vlv_engine.config import MORE_DETAILED_CAPTION
from vlv_engine.testing.official import FIXTURE_MEAN, FIXTURE_STD, bf16_rounded, write_official_fixture

GREEDY = dict(num_beams=1, max_new_tokens=12, postprocess=False)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_official_fixture(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def images(rgb_images):
    return rgb_images[:4]


@pytest.fixture(scope="module")
def official_engine(release):
    return Engine.from_official(stage2=release["stage2"], stage1=release["stage1"], **folders(release))


def folders(release, llm=True):
    names = ("florence2", "stable_diffusion", "llm") if llm else ("florence2", "stable_diffusion")
    return {k: release[k] for k in names}


def source_engine(model, release):
    return Engine(model, llm_tokenizer=release["llm_tokenizer"], text_tokenizer=release["text_tokenizer"])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def save_variant(tmp_path, sd, name="model.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


# --------------------------------------------------------------------------- pure key mapping


def test_real_florence2_large_names_map_to_native():
    # Names as Florence-2-large's remote code saves them (left-hand side of transformers' conversion script).
    expected = {
        "vision_tower.convs.0.proj.weight": "vision_tower.convs.0.conv.weight",
        "vision_tower.convs.3.norm.bias": "vision_tower.convs.3.norm.bias",
        "vision_tower.blocks.0.0.spatial_block.conv1.fn.dw.weight":
            "vision_tower.blocks.0.0.spatial_block.conv1.weight",
        "vision_tower.blocks.1.0.spatial_block.window_attn.norm.bias":
            "vision_tower.blocks.1.0.spatial_block.norm1.bias",
        "vision_tower.blocks.3.0.spatial_block.window_attn.fn.proj.weight":
            "vision_tower.blocks.3.0.spatial_block.window_attn.proj.weight",
        "vision_tower.blocks.2.4.spatial_block.ffn.norm.weight":
            "vision_tower.blocks.2.4.spatial_block.norm2.weight",
        "vision_tower.blocks.2.4.spatial_block.ffn.fn.net.fc2.bias":
            "vision_tower.blocks.2.4.spatial_block.ffn.fc2.bias",
        "vision_tower.blocks.2.8.channel_block.channel_attn.fn.qkv.weight":
            "vision_tower.blocks.2.8.channel_block.channel_attn.qkv.weight",
        "vision_tower.blocks.3.0.channel_block.channel_attn.norm.weight":
            "vision_tower.blocks.3.0.channel_block.norm1.weight",
        "vision_tower.blocks.2.0.channel_block.conv2.fn.dw.bias": "vision_tower.blocks.2.0.channel_block.conv2.bias",
        "vision_tower.blocks.1.0.channel_block.ffn.fn.net.fc1.weight":
            "vision_tower.blocks.1.0.channel_block.ffn.fc1.weight",
        "image_projection": "multi_modal_projector.image_projection.weight",
        "image_proj_norm.weight": "multi_modal_projector.image_proj_norm.weight",
        "image_pos_embed.row_embeddings.weight": "multi_modal_projector.image_position_embed.row_embeddings.weight",
        "image_pos_embed.column_embeddings.weight":
            "multi_modal_projector.image_position_embed.column_embeddings.weight",
        "visual_temporal_embed.pos_idx_to_embed": "multi_modal_projector.visual_temporal_embed.pos_idx_to_embed",
        "language_model.model.shared.weight": "language_model.shared.weight",
        "language_model.model.encoder.embed_tokens.weight": "language_model.encoder.embed_tokens.weight",
        "language_model.model.encoder.layers.11.self_attn.k_proj.weight":
            "language_model.encoder.layers.11.self_attn.k_proj.weight",
        "language_model.model.decoder.layers.11.encoder_attn_layer_norm.bias":
            "language_model.decoder.layers.11.encoder_attn_layer_norm.bias",
    }
    shared = torch.randn(5, 4)
    sd = {k: torch.randn(3) for k in expected}
    sd["language_model.model.shared.weight"] = shared
    sd["language_model.model.encoder.embed_tokens.weight"] = shared.clone()
    sd["image_projection"] = torch.randn(6, 4)  # [2048, 1024] in Florence-2-large: [in, out]
    sd["language_model.lm_head.weight"] = shared.clone()
    sd["language_model.final_logits_bias"] = torch.zeros(1, 5)
    native, dropped = florence_original_to_native(sd)
    assert set(native) == set(expected.values())
    for original, name in expected.items():
        want = sd[original].t() if original == "image_projection" else sd[original]
        assert torch.equal(native[name], want), original
    assert sorted(dropped) == ["language_model.final_logits_bias", "language_model.lm_head.weight"]


def test_unknown_florence_key_and_untied_duplicate_are_errors():
    with pytest.raises(OfficialCheckpointError, match=r"vision_tower\.norms\.weight"):
        florence_original_to_native({"vision_tower.norms.weight": torch.ones(2)})
    with pytest.raises(OfficialCheckpointError, match="decoder.embed_tokens.weight differs"):
        florence_original_to_native({"language_model.model.shared.weight": torch.ones(3, 2),
                                     "language_model.model.decoder.embed_tokens.weight": torch.zeros(3, 2)})


def test_swapped_files_are_reported():
    from vlv_engine.checkpoint.official import split_checkpoint

    with pytest.raises(OfficialCheckpointError, match="swapped"):
        split_checkpoint({"query_embed": torch.zeros(1, 2, 3), "model.image_projection": torch.zeros(2, 2)}, "stage2")


def test_split_official_gives_components_in_our_names(release):
    parts = split_official(release["stage2_state_dict"], release["stage1_state_dict"])
    model = release["model"]
    assert set(parts) == {"florence", "text_encoder", "adapter", "llm", "unet", "vae"}
    assert set(parts["adapter"]) == set(model.adapter_state_dict())
    assert set(parts["florence"]) == set(model.encoder.florence.state_dict())
    assert set(parts["text_encoder"]) == set(model.bottleneck.text_encoder.state_dict())
    assert set(parts["llm"]) == set(model.caption_decoder.llm.state_dict())
    assert parts["florence"]["language_model.shared.weight"].dtype == torch.bfloat16  # stage 2 wins
    assert parts["unet"][next(iter(parts["unet"]))].dtype == torch.float32  # stage 1 wins


# --------------------------------------------------------------------------- loading


def test_stage2_with_stage1_matches_the_source_model(release, official_engine, images):
    engine = official_engine
    cfg = engine.config
    assert cfg.name == "official"
    assert cfg.encoder.num_queries == 8 and cfg.encoder.image_size == 32
    assert cfg.encoder.image_mean == FIXTURE_MEAN and cfg.encoder.image_std == FIXTURE_STD
    assert cfg.encoder.prompt == MORE_DETAILED_CAPTION
    assert cfg.encoder.prompt_ids == release["model"].config.encoder.prompt_ids
    assert cfg.encoder.prompt_ids[0] == 0 and cfg.encoder.prompt_ids[-1] == 2  # <s> ... </s>
    assert (cfg.generation.num_beams, cfg.generation.max_new_tokens, cfg.generation.early_stopping,
            cfg.generation.postprocess) == (4, 300, True, True)
    assert cfg.diffusion.scheduler["_class_name"] == "DDPMScheduler"
    assert (cfg.diffusion.guidance_scale, cfg.diffusion.num_inference_steps) == (2.0, 50)

    # The encoder path and the LLM come from the bf16 model.pt; the UNet and VAE from stage 1 (fp32).
    reference = source_engine(bf16_rounded(release["model"]), release)
    got, want = engine.embed(images), reference.embed(images)
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, source_engine(release["model"], release).embed(images)) > 1e-4  # bf16 really used
    assert engine.caption(images, **GREEDY) == reference.caption(images, **GREEDY)
    a = engine.reconstruct(images[:1], steps=2, seed=3)[0]
    b = reference.reconstruct(images[:1], steps=2, seed=3)[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_stage2_alone_takes_the_frozen_unet_from_the_sd_folder(release):
    loaded = load_official(stage2=release["stage2"], **folders(release))
    source = release["model"].diffusion.unet.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in loaded.model.diffusion.unet.state_dict().items())


def test_stage1_only_embeds_and_reconstructs(release, images):
    engine = Engine.from_official(stage1=release["stage1"], **folders(release, llm=False))
    assert engine.model.caption_decoder is None
    source = source_engine(release["model"], release)
    assert rel_err(engine.embed(images), source.embed(images)) < 1e-5
    a = engine.reconstruct(images[:1], steps=2, seed=3)[0]
    b = source.reconstruct(images[:1], steps=2, seed=3)[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    with pytest.raises(RuntimeError, match="caption decoder"):
        engine.caption(images[:1])


def test_frozen_parts_missing_from_stage1_come_from_the_sd_folder(release, tmp_path, images):
    sd = {k: v for k, v in release["stage1_state_dict"].items()
          if not k.startswith(("module.text_encoder.", "module.unet.", "module.vae."))}
    loaded = load_official(stage1=save_variant(tmp_path, sd, "pytorch_model.bin"), **folders(release, llm=False))
    source = release["model"]
    got = source_engine(loaded.model, release).embed(images)
    assert rel_err(got, source_engine(source, release).embed(images)) < 1e-5
    for part in ("unet", "vae"):
        want = getattr(source.diffusion, part).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(loaded.model.diffusion, part).state_dict().items())


def test_absent_tied_copies_are_filled_from_their_twins(release, tmp_path, official_engine, images):
    sd = dict(release["stage2_state_dict"])
    del sd["qwen2_model.lm_head.weight"]  # tied to qwen2_model.model.embed_tokens.weight
    del sd["VLV_model.model.language_model.model.decoder.embed_tokens.weight"]  # tied to shared
    engine = Engine.from_official(stage2=save_variant(tmp_path, sd), stage1=release["stage1"], **folders(release))
    assert torch.equal(engine.embed(images[:2]), official_engine.embed(images[:2]))
    assert engine.caption(images[:2], **GREEDY) == official_engine.caption(images[:2], **GREEDY)


def test_native_layout_florence_folder_is_accepted(release, tmp_path, official_engine, images):
    from transformers import Florence2Config

    native = tmp_path / "florence_native"
    shutil.copytree(release["florence2"], native)
    (native / "pytorch_model.bin").unlink()
    florence = json.loads(json.dumps(release["model"].config.encoder.florence))
    florence["text_config"]["vocab_size"] += 1  # the port's extra <image> token; the checkpoint's size wins
    Florence2Config(**florence).save_pretrained(native)
    engine = Engine.from_official(stage2=release["stage2"], stage1=release["stage1"],
                                  **{**folders(release), "florence2": native})
    assert torch.equal(engine.embed(images[:2]), official_engine.embed(images[:2]))


def test_missing_key_is_named(release, tmp_path):
    sd = dict(release["stage2_state_dict"])
    del sd["VLV_model.model.language_model.model.encoder.layers.0.fc1.weight"]
    del sd["mlp.layers.2.bias"]
    with pytest.raises(OfficialCheckpointError) as err:
        load_official(stage2=save_variant(tmp_path, sd), **folders(release))
    assert "language_model.encoder.layers.0.fc1.weight" in str(err.value)
    assert "caption_proj.2.bias" in str(err.value)  # every problem in one error


@pytest.mark.parametrize("key, named", [
    ("VLV_model.extra_head.weight", "VLV_model.extra_head.weight"),  # matches no rule
    ("VLV_model.model.language_model.model.encoder.layers.0.extra.weight",  # not in the model (strict load)
     "language_model.encoder.layers.0.extra.weight"),
])
def test_unexpected_key_is_named(release, tmp_path, key, named):
    sd = {**release["stage2_state_dict"], key: torch.zeros(2)}
    with pytest.raises(OfficialCheckpointError) as err:
        load_official(stage2=save_variant(tmp_path, sd), **folders(release))
    assert named in str(err.value)


def test_pickle_that_runs_code_is_refused(release, tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = save_variant(tmp_path, {"qwen2_model.model.norm.weight": torch.ones(2), "payload": Payload()})
    with pytest.raises(UnsafeCheckpointError):
        load_official(stage2=path, **folders(release))
    assert not marker.exists()


def test_convert_then_from_pretrained_round_trips(release, tmp_path, official_engine, images):
    out = convert_official(tmp_path / "converted", stage2=release["stage2"], stage1=release["stage1"],
                           **folders(release))
    engine = Engine.from_pretrained(out)
    assert engine.config.name == "official" and engine.config.generation.num_beams == 4
    assert torch.equal(engine.embed(images), official_engine.embed(images))
    assert engine.caption(images, **GREEDY) == official_engine.caption(images, **GREEDY)


def test_stage1_only_conversion_loads_as_an_embedding_model(release, tmp_path, images):
    out = convert_official(tmp_path / "stage1", stage1=release["stage1"], **folders(release, llm=False))
    engine = Engine.from_pretrained(out)  # no llm/: nothing to opt out of
    assert engine.model.caption_decoder is None
    source = Engine.from_official(stage1=release["stage1"], **folders(release, llm=False))
    assert torch.equal(engine.embed(images), source.embed(images))


def test_from_official_takes_the_engine_options(release, images):
    engine = Engine.from_official(stage2=release["stage2"], stage1=release["stage1"], decoder="reference",
                                  **folders(release))
    assert engine.decoder == "reference"
    # Every option of the constructor, as from_pretrained takes them.
    sized = Engine.from_official(stage2=release["stage2"], stage1=release["stage1"], batch_size=3,
                                 encoder_batch_size=2, max_pixels=10_000, **folders(release))
    assert (sized.batch_size, sized.encoder_batch_size, sized.max_pixels) == (3, 2, 10_000)
    with pytest.raises(TypeError, match="batch_sise"):
        Engine.from_official(stage2=release["stage2"], batch_sise=3, **folders(release))
    with pytest.raises(ValueError, match="unknown decoder"):
        Engine.from_official(stage2=release["stage2"], decoder="fast", **folders(release))
    # The encoder backend and the decoder's quantization reach the engine too (checked at
    # construction: a GPU-only scheme is refused on this CPU engine, naming the scheme).
    from vlv_engine.engine.quantize import QuantizationError

    with pytest.raises(QuantizationError, match="fp8"):
        Engine.from_official(stage2=release["stage2"], stage1=release["stage1"], quantize="fp8", **folders(release))
    with pytest.raises(ValueError, match="encoder"):
        Engine.from_official(stage2=release["stage2"], stage1=release["stage1"], encoder_backend="fastest",
                             **folders(release))
