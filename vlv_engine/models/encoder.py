"""VLV encoder: Florence-2 + learnable queries + language_proj (phi).

image -> DaViT + projection -> [image tokens, prompt tokens] -> BART encoder
      -> BART decoder on the Nq learnable queries (causal self-attention,
         cross-attention to the encoder) -> phi -> [B, Nq, D_text]
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Florence2Config, Florence2Model

from vlv_engine.config import EncoderConfig
from vlv_engine.models.mlp import projector


class VLVEncoder(nn.Module):
    def __init__(self, florence: Florence2Model, config: EncoderConfig, text_hidden_size: int):
        super().__init__()
        self.config = config
        self.florence = florence
        d_model = florence.config.text_config.d_model
        # randn init as in the official code: the queries start at the scale of token embeddings.
        self.query_embed = nn.Parameter(torch.randn(1, config.num_queries, d_model))
        self.language_proj = projector(d_model, text_hidden_size)
        if not config.prompt_ids:
            raise ValueError("EncoderConfig.prompt_ids is empty: the task prompt must be tokenized")
        self.register_buffer("prompt_ids", torch.tensor(config.prompt_ids, dtype=torch.long), persistent=False)
        self.register_buffer("frozen_prompt", None, persistent=False)  # see freeze_prompt

    @classmethod
    def from_config(cls, config: EncoderConfig, text_hidden_size: int) -> "VLVEncoder":
        florence = Florence2Model(Florence2Config(**config.florence))
        return cls(florence, config, text_hidden_size)

    @property
    def num_queries(self) -> int:
        return self.query_embed.shape[1]

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, T_img, d_model] (T_img = (H/s)*(W/s) + 1), in Florence-2's dtype."""
        # Florence-2 may run in another dtype than the rest (the bf16 encoder scheme,
        # `engine.encoder_quant`): the pixels enter in its dtype (a no-op when they agree).
        pixel_values = pixel_values.to(next(self.florence.vision_tower.parameters()).dtype)
        feats = self.florence.vision_tower(pixel_values).last_hidden_state  # [B, C, h, w]
        # The tower returns a batch-dependent memory layout (channels-last strides for
        # B > 1); the projector's reductions then sum in a different order. A fixed
        # layout keeps every image's tokens bit-identical whatever its batch.
        return self.florence.multi_modal_projector(feats.contiguous())

    def prompt_embeddings(self) -> torch.Tensor:
        """The task prompt's token embeddings [T_prompt, d_model]."""
        if self.frozen_prompt is not None:
            return self.frozen_prompt
        return self.florence.get_input_embeddings()(self.prompt_ids)

    @torch.no_grad()
    def freeze_prompt(self) -> None:
        """Keep the prompt's embeddings as they are now, for inference: the path then never
        reads Florence-2's vocabulary table (`engine.unread_tables`). Not saved with the
        weights, and stale once the table is trained: training never calls this."""
        self.frozen_prompt = None
        self.frozen_prompt = self.prompt_embeddings().detach().clone()

    def encoder_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Florence's BART encoder over [image tokens, prompt tokens]: [B, T_img + T_prompt, d_model]."""
        image = self.image_tokens(pixel_values)  # [B, T_img, d]
        prompt = self.prompt_embeddings()  # [T_prompt, d]
        prompt = prompt.to(image.dtype).unsqueeze(0).expand(image.shape[0], -1, -1)
        # Every image has the same number of tokens and the prompt is shared, so no
        # padding and no attention mask: nothing in this path depends on the batch.
        tokens = torch.cat([image, prompt], dim=1)
        return self.florence.language_model.encoder(inputs_embeds=tokens).last_hidden_state

    def query_states(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """BART decoder on the learnable queries: [B, Nq, d_model]."""
        batch = encoder_states.shape[0]
        queries = self.query_embed.to(encoder_states.dtype).expand(batch, -1, -1)
        out = self.florence.language_model.decoder(
            inputs_embeds=queries, encoder_hidden_states=encoder_states, use_cache=False
        )
        return out.last_hidden_state

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected queries [B, Nq, D_text], the text encoder's input."""
        queries = self.query_states(self.encoder_states(pixel_values))
        return self.language_proj(queries.to(self.query_embed.dtype))  # phi in its own dtype
