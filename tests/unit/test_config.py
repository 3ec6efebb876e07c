import pytest

from vlv_engine.config import PRESETS, GenerationConfig, VLVConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(tmp_path, name):
    config = preset(name)
    config.save(tmp_path / "vlv.json")
    assert VLVConfig.load(tmp_path / "vlv.json") == config


def test_presets_are_fresh_copies():
    a = preset("tiny")
    a.encoder.num_queries = 99
    assert preset("tiny").encoder.num_queries != 99


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="paper"):
        preset("huge")


def test_paper_dimensions_match_the_release():
    c = preset("paper")
    assert c.encoder.num_queries == 77 and c.encoder.image_size == 768
    assert c.encoder.hidden_size == 1024 and c.bottleneck.hidden_size == 1024
    assert c.caption_decoder.hidden_size == 2048 and c.caption_decoder.llm["num_hidden_layers"] == 36
    assert c.diffusion.unet["cross_attention_dim"] == 1024
    assert c.generation.num_beams == 4 and c.generation.max_new_tokens == 300


def test_generation_overrides_and_rejects_unknown_options():
    g = GenerationConfig()
    assert g.merged(num_beams=1).num_beams == 1
    assert g.merged(num_beams=None).num_beams == g.num_beams
    with pytest.raises(TypeError, match="temprature"):
        g.merged(temprature=0.5)


def test_newer_format_is_refused(tmp_path):
    data = preset("tiny").to_dict()
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format_version"):
        VLVConfig.from_dict(data)
