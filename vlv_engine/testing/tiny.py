"""Tiny random VLV models: the whole pipeline in well under a second on a CPU."""

from __future__ import annotations

import torch

from vlv_engine.config import VLVConfig, preset
from vlv_engine.tokenization import word_level_tokenizer

# Enough words that random models produce varied captions; fits the tiny vocab (64).
TINY_WORDS = ("a small large red green blue yellow purple orange circle square triangle at the top bottom "
              "left right center middle and describe image of with").split()


def tiny_tokenizers(config: VLVConfig | None = None):
    """(llm_tokenizer, text_tokenizer) sized to the tiny preset's vocabularies."""
    config = config or preset("tiny")
    llm_tok = word_level_tokenizer(TINY_WORDS, add_bos=False, add_eos=True)
    text_tok = word_level_tokenizer(TINY_WORDS, add_bos=True, add_eos=True,
                                    model_max_length=config.bottleneck.text_encoder["max_position_embeddings"])
    assert len(llm_tok) <= config.caption_decoder.llm["vocab_size"]
    return llm_tok, text_tok


def tiny_model(seed: int = 0, *, with_diffusion: bool = True):
    from vlv_engine.models import VLVModel

    torch.manual_seed(seed)
    model = VLVModel.from_config(preset("tiny"), with_diffusion=with_diffusion)
    with torch.no_grad():
        # Small queries let the (wide-init) cross-attention to the image dominate.
        model.encoder.query_embed.mul_(0.1)
    return model.eval()


def tiny_engine(seed: int = 0, *, with_diffusion: bool = True, **kwargs):
    from vlv_engine.engine import Engine

    model = tiny_model(seed, with_diffusion=with_diffusion)
    llm_tok, text_tok = tiny_tokenizers(model.config)
    return Engine(model, llm_tokenizer=llm_tok, text_tokenizer=text_tok, **kwargs)
