"""Caption decoder: psi (caption_proj) maps caption embeddings into the LLM's input space.

The LLM then generates from the Nq prefix vectors alone (no text prompt).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from vlv_engine.models.mlp import projector


class CaptionDecoder(nn.Module):
    def __init__(self, llm: PreTrainedModel, embedding_size: int):
        super().__init__()
        self.llm = llm
        self.caption_proj = projector(embedding_size, llm.config.hidden_size)

    @classmethod
    def from_config(cls, llm_config: dict, embedding_size: int) -> "CaptionDecoder":
        kwargs = dict(llm_config)
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        return cls(AutoModelForCausalLM.from_config(config), embedding_size)

    def prefix(self, caption_embedding: torch.Tensor) -> torch.Tensor:
        """[B, Nq, D] -> [B, Nq, H] prefix embeddings in the LLM's dtype."""
        return self.caption_proj(caption_embedding.to(self.caption_proj[0].weight.dtype)).to(self.llm.dtype)

    def forward(self, caption_embedding: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """Teacher-forced pass over [prefix, caption tokens]; labels use -100 on ignored positions."""
        prefix = self.prefix(caption_embedding)  # [B, Nq, H]
        tokens = self.llm.get_input_embeddings()(input_ids)  # [B, T, H]
        embeds = torch.cat([prefix, tokens], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        full_labels = None
        if labels is not None:
            full_labels = torch.cat([labels.new_full(prefix.shape[:2], -100), labels], dim=1)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=full_labels, use_cache=False)
