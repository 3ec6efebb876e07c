"""The two training objectives.

Stage 1 (images only): the caption embedding conditions the frozen UNet, which must
predict the noise added to the image's latents; gradients flow through the frozen
UNet and text encoder into what is trained.
Stage 2: next-token loss of the LLM on the caption after the Nq prefix vectors; only
caption tokens count, and the EOS is one of them so generation learns to stop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlv_engine.models import VLVModel


def sample_latents(moments: torch.Tensor, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
    """Cached VAE moments [B, 2C, h, w] (mean, logvar) -> a fresh latent sample, scaled."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


def draw_noise(latents: torch.Tensor, num_train_timesteps: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t ~ U{0..T-1} and Gaussian noise, from the run's own generator (resumable)."""
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return t, noise


class Stage1Objective(nn.Module):
    """Noise-prediction loss through the frozen UNet, conditioned on the caption embedding."""

    def __init__(self, model: VLVModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """pixel_values: encoder input [B, 3, S, S]; latents: scaled VAE latents [B, C, h, w]."""
        diffusion = self.model.diffusion
        sched = diffusion.scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {sched.config.prediction_type!r}")
        cond = self.model.caption_embedding(pixel_values)  # [B, Nq, D]
        pred = diffusion.predict_noise(noisy.to(cond.dtype), timesteps, cond)
        return F.mse_loss(pred.float(), target.float())


class Stage2Objective(nn.Module):
    """Next-token loss on the caption tokens after the Nq prefix vectors."""

    def __init__(self, model: VLVModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        emb = self.model.caption_embedding(pixel_values)
        return self.model.caption_decoder(emb, input_ids, labels=labels, attention_mask=attention_mask).loss
