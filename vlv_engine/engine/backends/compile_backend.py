"""``torch.compile`` of the UNet step (inductor: C++/OpenMP on the CPU, Triton on CUDA).

The compiled module is `UNetStep` (coordinate channels appended inside, like the
other backends), so its inputs follow the UNet contract: plain latents, a float32
timestep vector [B], the caption embedding. ``channels_last`` converts the UNet's
weights to the channels-last layout (values unchanged; it changes the layout of the
decoder's own UNet, which the eager path then also uses) and feeds channels-last
latents: on CUDA convolutions prefer it. Compiling costs tens of seconds on the first
call and on every new batch size (dynamic shapes are tried after the second).
"""

from __future__ import annotations

import torch

from vlv_engine.engine.backends.contract import UNetStep, VAEDecoderStep, batch_timestep


class CompiledUNetRunner:
    backend = "compile"

    def __init__(self, decoder, *, channels_last: bool = False, mode: str | None = None, fullgraph: bool = False,
                 dynamic: bool | None = None):
        self.channels_last = channels_last
        if channels_last:
            decoder.unet.to(memory_format=torch.channels_last)
        self.dtype = decoder.unet.dtype
        self.step = UNetStep(decoder.unet, decoder.coord_channels).eval()
        self.compiled = torch.compile(self.step, mode=mode, fullgraph=fullgraph, dynamic=dynamic)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = latents.to(self.dtype)  # [B, C, h, w]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.compiled(x, batch_timestep(t, latents), context.to(self.dtype))
        return out.to(latents.dtype).contiguous()


class CompiledVAEDecoderRunner:
    """``torch.compile`` of ``vae.decode``: unscaled latents -> images in [-1, 1]."""

    backend = "compile"

    def __init__(self, decoder, *, mode: str | None = None, dynamic: bool | None = None):
        self.dtype = decoder.vae.dtype
        self.compiled = torch.compile(VAEDecoderStep(decoder.vae).eval(), mode=mode, dynamic=dynamic)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.compiled(latents.to(self.dtype)).to(latents.dtype).contiguous()
