"""VLVModel: the three modules composed; the encoder path ends in the caption embedding."""

from __future__ import annotations

import torch
from torch import nn

from vlv_engine.config import VLVConfig
from vlv_engine.models.bottleneck import Bottleneck
from vlv_engine.models.caption_decoder import CaptionDecoder
from vlv_engine.models.diffusion import DiffusionDecoder
from vlv_engine.models.encoder import VLVEncoder


class VLVModel(nn.Module):
    def __init__(self, config: VLVConfig, encoder: VLVEncoder, bottleneck: Bottleneck,
                 caption_decoder: CaptionDecoder | None, diffusion: DiffusionDecoder | None):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.caption_decoder = caption_decoder
        self.diffusion = diffusion

    @classmethod
    def from_config(cls, config: VLVConfig, *, with_caption_decoder: bool = True,
                    with_diffusion: bool = True) -> "VLVModel":
        """Random weights (tests, presets, the start of training)."""
        bottleneck = Bottleneck.from_config(config.bottleneck.text_encoder)
        encoder = VLVEncoder.from_config(config.encoder, bottleneck.hidden_size)
        decoder = (CaptionDecoder.from_config(config.caption_decoder.llm, bottleneck.hidden_size)
                   if with_caption_decoder and config.caption_decoder.llm else None)
        diffusion = (DiffusionDecoder.from_config(config.diffusion)
                     if with_diffusion and config.diffusion is not None else None)
        return cls(config, encoder, bottleneck, decoder, diffusion)

    def caption_embedding(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalized pixels -> [B, Nq, D] caption embedding."""
        return self.bottleneck(self.encoder(pixel_values))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The VLV-specific weights, under the names of `adapter.safetensors`."""
        sd = {"query_embed": self.encoder.query_embed}
        sd.update({f"language_proj.{k}": v for k, v in self.encoder.language_proj.state_dict().items()})
        if self.caption_decoder is not None:
            sd.update({f"caption_proj.{k}": v for k, v in self.caption_decoder.caption_proj.state_dict().items()})
        return {k: v.detach() for k, v in sd.items()}

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict: every adapter weight present, nothing unknown, shapes equal."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise KeyError(f"adapter weights do not match the model: missing {missing}, unexpected {unexpected}")
        for name, value in sd.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ValueError(f"adapter weight {name!r}: shape {tuple(value.shape)} in the checkpoint, "
                                 f"{tuple(expected[name].shape)} in the model")
        with torch.no_grad():
            self.encoder.query_embed.copy_(sd["query_embed"])
            self.encoder.language_proj.load_state_dict(
                {k[len("language_proj."):]: v for k, v in sd.items() if k.startswith("language_proj.")}, strict=True)
            if self.caption_decoder is not None:
                self.caption_decoder.caption_proj.load_state_dict(
                    {k[len("caption_proj."):]: v for k, v in sd.items() if k.startswith("caption_proj.")}, strict=True)
