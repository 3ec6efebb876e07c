"""Reference caption generation: transformers' `generate` on the prefix embeddings.

Greedy (num_beams=1) or beam search, deterministic (no sampling). The prefix
always has Nq positions, so a batch needs no padding and every row decodes as it
would alone. Fast paths (a static KV cache, compiled decode step) are checked
against this function.
"""

from __future__ import annotations

import torch
import transformers
from transformers import PreTrainedModel

from vlv_engine.config import GenerationConfig


def hf_generation_config(gen: GenerationConfig, *, eos_token_id: int | None, pad_token_id: int | None):
    # A complete config of our own, so defaults shipped with an LLM (sampling,
    # repetition penalties in instruct models' generation_config.json) never apply.
    return transformers.GenerationConfig(
        max_new_tokens=gen.max_new_tokens,
        num_beams=gen.num_beams,
        do_sample=False,
        early_stopping=gen.early_stopping if gen.num_beams > 1 else False,
        length_penalty=gen.length_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
        bos_token_id=None,
    )


@torch.no_grad()
def generate_reference(llm: PreTrainedModel, prefix: torch.Tensor, gen: GenerationConfig, *,
                       eos_token_id: int | None, pad_token_id: int | None) -> torch.Tensor:
    """[B, Nq, H] prefix -> [B, T] new token ids (padded with pad_token_id after EOS)."""
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    config = hf_generation_config(gen, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return llm.generate(inputs_embeds=prefix, attention_mask=mask, generation_config=config)
