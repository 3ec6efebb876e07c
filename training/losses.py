"""The training objectives.

VAE and teacher (the nano recipe's stand-in for a pretrained text-to-image model):
reconstruction, and text-conditioned noise prediction.
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


def sample_latents(moments: torch.Tensor, generator: torch.Generator, scaling_factor: float,
                   mode: bool = False) -> torch.Tensor:
    """Cached VAE moments [B, 2C, h, w] (mean, logvar) -> a fresh latent sample (or the
    posterior mean when `mode`), scaled."""
    mean, logvar = moments.chunk(2, dim=1)
    if mode:
        return mean * scaling_factor
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


def draw_noise(latents: torch.Tensor, num_train_timesteps: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t ~ U{0..T-1} and Gaussian noise, from the run's own generator (resumable)."""
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return t, noise


def snr_weights(scheduler, timesteps: torch.Tensor, mode: str, gamma: float) -> torch.Tensor | None:
    """Per-sample loss weights for epsilon prediction; None means uniform."""
    if mode == "none":
        return None
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    if scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def noise_prediction_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def _target(sched, latents, noise, timesteps):
    if sched.config.prediction_type == "epsilon":
        return noise
    if sched.config.prediction_type == "v_prediction":
        return sched.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {sched.config.prediction_type!r}")


def denoising_loss(diffusion, cond: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, weighting: str, gamma: float) -> torch.Tensor:
    """The UNet, conditioned on `cond`, predicts what was added to the noised latents."""
    sched = diffusion.scheduler
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = diffusion.predict_noise(noisy.to(cond.dtype), timesteps, cond)
    weights = snr_weights(sched, timesteps, weighting, gamma)
    return noise_prediction_loss(pred, _target(sched, latents, noise, timesteps), weights)


class VAEObjective(nn.Module):
    """The nano recipe's VAE: reconstruction MSE + a small KL pull towards N(0, I)."""

    def __init__(self, model: VLVModel, kl_weight: float):
        super().__init__()
        self.model, self.kl_weight = model, kl_weight

    def forward(self, vae_pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        vae = self.model.diffusion.vae
        posterior = vae.encode(vae_pixels).latent_dist
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        return F.mse_loss(recon.float(), vae_pixels.float()) + self.kl_weight * posterior.kl().mean()


class TeacherObjective(nn.Module):
    """Text-to-image noise prediction: the stand-in for a pretrained diffusion model."""

    def __init__(self, model: VLVModel, loss_weighting: str = "none", gamma: float = 5.0):
        super().__init__()
        self.model, self.loss_weighting, self.gamma = model, loss_weighting, gamma

    def forward(self, input_ids: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        cond = self.model.bottleneck.encode_ids(input_ids)  # [B, L, D]
        return denoising_loss(self.model.diffusion, cond, latents, noise, timesteps, self.loss_weighting,
                              self.gamma)


class Stage1Objective(nn.Module):
    """Noise-prediction loss through the frozen UNet, conditioned on the caption embedding."""

    def __init__(self, model: VLVModel, loss_weighting: str = "none", gamma: float = 5.0):
        super().__init__()
        self.model, self.loss_weighting, self.gamma = model, loss_weighting, gamma

    def forward(self, pixel_values: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """pixel_values: encoder input [B, 3, S, S]; latents: scaled VAE latents [B, C, h, w]."""
        cond = self.model.caption_embedding(pixel_values)  # [B, Nq, D]
        return denoising_loss(self.model.diffusion, cond, latents, noise, timesteps, self.loss_weighting,
                              self.gamma)


class Stage2Objective(nn.Module):
    """Next-token loss on the caption tokens after the Nq prefix vectors."""

    def __init__(self, model: VLVModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        emb = self.model.caption_embedding(pixel_values)
        return self.model.caption_decoder(emb, input_ids, labels=labels, attention_mask=attention_mask).loss
