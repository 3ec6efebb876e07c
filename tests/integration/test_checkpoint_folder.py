"""Our folder format: exact round trip, strict loading."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlv_engine import Engine
from vlv_engine.checkpoint.folder import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    tiny.save_pretrained(path)
    return path


def test_folder_layout(saved):
    names = {p.name for p in saved.iterdir()}
    assert {"vlv.json", "adapter.safetensors", "vision", "text_encoder", "tokenizer", "llm", "unet", "vae",
            "scheduler"} <= names
    adapter = load_file(str(saved / "adapter.safetensors"))
    assert set(adapter) == {"query_embed", "language_proj.0.weight", "language_proj.0.bias",
                            "language_proj.2.weight", "language_proj.2.bias", "caption_proj.0.weight",
                            "caption_proj.0.bias", "caption_proj.2.weight", "caption_proj.2.bias"}
    assert adapter["query_embed"].shape == (1, 8, 32)
    meta = json.loads((saved / "vlv.json").read_text())
    assert meta["encoder"]["num_queries"] == 8 and meta["encoder"]["prompt_ids"]
    assert not any(p.name.startswith(".") for p in saved.parent.iterdir())  # no temp leftovers


def test_round_trip_is_exact(saved, tiny, rgb_images):
    loaded = Engine.from_pretrained(saved)
    assert torch.equal(loaded.embed(rgb_images), tiny.embed(rgb_images))
    assert loaded.caption(rgb_images) == tiny.caption(rgb_images)
    assert loaded.caption(rgb_images, num_beams=2) == tiny.caption(rgb_images, num_beams=2)
    a = loaded.reconstruct(rgb_images[:2], steps=2, seed=1)
    b = tiny.reconstruct(rgb_images[:2], steps=2, seed=1)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_caption_only_loading_skips_diffusion(saved, tiny, rgb_images):
    loaded = Engine.from_pretrained(saved, load_diffusion=False)
    assert loaded.model.diffusion is None
    assert loaded.caption(rgb_images[:2]) == tiny.caption(rgb_images[:2])


def test_save_over_existing_folder_replaces_it(tmp_path, tiny):
    path = tmp_path / "m"
    tiny.save_pretrained(path)
    (path / "stale.txt").write_text("x")
    tiny.save_pretrained(path)
    assert not (path / "stale.txt").exists() and (path / "vlv.json").exists()


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_missing_component_weight_is_an_error(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    f = dst / "text_encoder" / "model.safetensors"
    sd = load_file(str(f))
    victim = sorted(sd)[3]
    del sd[victim]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="text_encoder.*missing"):
        Engine.from_pretrained(dst)


def test_unexpected_adapter_weight_is_an_error(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    sd = load_file(str(dst / "adapter.safetensors"))
    sd["surprise"] = torch.zeros(1)
    save_file(sd, str(dst / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="surprise"):
        Engine.from_pretrained(dst)


def test_wrong_adapter_shape_is_an_error(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    sd = load_file(str(dst / "adapter.safetensors"))
    sd["query_embed"] = torch.zeros(1, 9, 32)
    save_file(sd, str(dst / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="query_embed"):
        Engine.from_pretrained(dst)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="vlv.json"):
        Engine.from_pretrained(tmp_path)


def test_bfloat16_round_trip(tmp_path, rgb_images):
    from vlv_engine.testing import tiny_engine

    engine = tiny_engine(dtype=torch.bfloat16, with_diffusion=False)
    engine.save_pretrained(tmp_path / "bf16")
    loaded = Engine.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert loaded.model.encoder.query_embed.dtype == torch.bfloat16
    assert torch.equal(loaded.embed(rgb_images[:3]), engine.embed(rgb_images[:3]))
    assert loaded.caption(rgb_images[:3]) == engine.caption(rgb_images[:3])
