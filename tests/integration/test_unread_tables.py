"""The caption path never reads the two vocabulary tables an engine keeps on the host
on a GPU (vlv_engine.engine.unread_tables): moved to the meta device, where any read
fails, they leave every embedding and caption as it was."""

import pytest
import torch

from vlv_engine.engine.encoder_path import FusedEncoderPath
from vlv_engine.engine.unread_tables import move_unread_tables, unread_tables
from vlv_engine.testing import tiny_engine, tiny_model


def _pixels(engine, n=3):
    size = engine.config.encoder.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_frozen_prompt_is_the_lookup_and_is_not_saved():
    model = tiny_model(0, with_diffusion=False)
    enc = model.encoder
    lookup = enc.florence.get_input_embeddings()(enc.prompt_ids)
    assert enc.frozen_prompt is None
    enc.freeze_prompt()
    assert torch.equal(enc.frozen_prompt, lookup)
    assert "encoder.frozen_prompt" not in model.state_dict()
    # The copy is the prompt as it was: a later change to the table does not reach it.
    with torch.no_grad():
        enc.florence.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(enc.prompt_embeddings(), lookup)


def test_caption_path_reads_neither_table():
    engine = tiny_engine(0, with_diffusion=False)  # the engine froze the prompt
    pixels = _pixels(engine)
    with torch.no_grad():
        before = engine.encode_pixels(pixels)
        fused_before = FusedEncoderPath(engine.model)(pixels)
    captions_before = engine.caption_embeddings(before)

    lm = engine.model.encoder.florence.language_model
    florence, clip = lm.shared.weight, engine.model.bottleneck.text_encoder.embeddings.token_embedding.weight
    moved = move_unread_tables(engine.model, "meta")
    assert moved == (florence.numel() + clip.numel()) * 4  # the tied table once
    assert all(t.weight.is_meta for t in unread_tables(engine.model))
    # BART's encoder and decoder share the table: they followed it, still tied.
    assert lm.encoder.embed_tokens.weight is lm.shared.weight is lm.decoder.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(engine.encode_pixels(pixels), before)
        assert torch.equal(FusedEncoderPath(engine.model)(pixels), fused_before)
    assert engine.caption_embeddings(before) == captions_before


def test_moving_the_tables_needs_a_frozen_prompt():
    model = tiny_model(0, with_diffusion=False)
    with pytest.raises(RuntimeError, match="freeze the encoder's prompt"):
        move_unread_tables(model, "meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_diffusion", [False, True])
def test_cuda_engine_keeps_the_tables_on_the_host_without_diffusion(with_diffusion):
    engine = tiny_engine(0, with_diffusion=with_diffusion, device="cuda")
    want = "cuda" if with_diffusion else "cpu"  # reconstruct reads the CLIP table
    assert {t.weight.device.type for t in unread_tables(engine.model)} == {want}
    assert engine.model.encoder.query_embed.device.type == "cuda"
    pixels = _pixels(engine).cuda()
    with torch.no_grad():
        assert engine.encode_pixels(pixels).device.type == "cuda"
