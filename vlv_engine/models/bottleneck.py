"""The bottleneck: a CLIP text encoder run on continuous inputs instead of token ids.

transformers' CLIPTextModel only accepts token ids, so the same computation is
composed from its parts: position embeddings added to the inputs, a causal mask,
the encoder with ``is_causal=True`` (without it SDPA attends bidirectionally),
then the final LayerNorm. Its output is the caption embedding [B, Nq, D].
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.masking_utils import create_causal_mask


class Bottleneck(nn.Module):
    def __init__(self, text_encoder: CLIPTextModel):
        super().__init__()
        self.text_encoder = text_encoder

    @classmethod
    def from_config(cls, config: dict) -> "Bottleneck":
        return cls(CLIPTextModel(CLIPTextConfig(**config)))

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """[B, Nq, D] projected queries -> [B, Nq, D] caption embedding."""
        te = self.text_encoder
        hidden = te.embeddings(inputs_embeds=inputs_embeds)  # + position embeddings
        # Positional: the cache argument's keyword is being renamed across transformers 5.x.
        mask = create_causal_mask(te.config, hidden, None, None)  # no padding, no cache
        hidden = te.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return te.final_layer_norm(hidden)

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> last hidden state: the ordinary text-to-image conditioning path."""
        return self.text_encoder(input_ids=input_ids).last_hidden_state
