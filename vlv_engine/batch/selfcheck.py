"""Self-check: redraw each image from its caption embedding and score how close it came.

A caption is only as good as the embedding it was decoded from, and the VLV
auto-encoder can show that embedding: the frozen diffusion decoder redraws the image
from it (``Engine.reconstruct``'s machinery: one seeded generator per image, a few
DPM-Solver++ steps).  An image whose redraw looks nothing like it was not understood,
and its caption is suspect; ``vlv caption --self-check`` writes the score into the
record and flags records below a threshold.

The metric (``fidelity``), in [0, 1], 1 for identical images, is the mean of

* a colour-histogram intersection (4 x 4 x 4 joint RGB bins over the whole image):
  which colours, in what amounts, regardless of where;
* the structural similarity (SSIM, 7 x 7 windows, the usual constants) of the luma
  downsampled to 32 x 32 with a box filter, clipped at 0: the coarse layout.

Why these and not a perceptual network (LPIPS, CLIP similarity): the project bundles
no pretrained vision network to score with, and a randomly initialised one measures
nothing.  A redraw from a caption embedding is not pixel-aligned at fine scale (the
diffusion model draws its own texture and edges), so full-resolution pixel errors
would punish exactly what a caption cannot convey; what a caption does convey is
colours, objects and their rough placement, which is what a colour histogram and
low-resolution SSIM see (Shapes World captions name colour, shape and position and
nothing else).  Both are a few microseconds of numpy per image.

Deterministic whatever the batch: the UNet's convolutions choose kernels by batch
size (on this CPU the nano architecture's redraws differ by one grey level between
batches of 6 and 1), so each image is redrawn alone, from its own embedding (which
the engine computes bit-identically in any batch), with its own seeded noise.  The
score is rounded to 6 decimals.  Everything the score depends on (steps, guidance,
seed, sampler, threshold, the metric's version and a hash of the diffusion decoder's
weights) is part of the job's generation hash, so changing any of it redoes the job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["METRIC_VERSION", "RECORD_COLUMNS", "SelfCheck", "SelfCheckOptions", "fidelity"]

#: Bump when ``fidelity`` or a redraw's sampler changes: finished self-checked jobs then
#: redo their scores. 2: the "dpm" sampler spaces its timesteps "trailing".
METRIC_VERSION = 2
#: The fields a self-checked record gains, with their parquet types.
RECORD_COLUMNS = {"self_check_score": "float64", "self_check_low": "bool"}

_HIST_LEVELS = 4  # per channel: 64 joint bins
_SSIM_SIZE = 32
_SSIM_WINDOW = 7
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


@dataclass(frozen=True)
class SelfCheckOptions:
    steps: int = 8  # DPM-Solver++ steps of the redraw
    guidance_scale: float | None = None  # None: the model's own
    seed: int = 0
    sampler: str = "dpm"
    threshold: float = 0.5  # records scoring below it get self_check_low = true

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"self-check steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"self-check threshold must be in [0, 1], got {self.threshold}")


def fidelity(original: np.ndarray, redrawn: np.ndarray) -> float:
    """Similarity in [0, 1] of two uint8 RGB images ``[H, W, 3]`` (sizes may differ)."""
    for name, a in (("original", original), ("redrawn", redrawn)):
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"{name} image must be uint8 [H, W, 3], got {a.dtype} {list(a.shape)}")
    hist = float(np.minimum(_histogram(original), _histogram(redrawn)).sum())
    ssim = _ssim(_luma(original), _luma(redrawn))
    return round(min(1.0, 0.5 * hist + 0.5 * max(0.0, ssim)), 6)


def _histogram(a: np.ndarray) -> np.ndarray:
    q = (a >> 6).astype(np.int64)  # 256 / 4 levels
    idx = (q[..., 0] * _HIST_LEVELS + q[..., 1]) * _HIST_LEVELS + q[..., 2]
    counts = np.bincount(idx.ravel(), minlength=_HIST_LEVELS ** 3)
    return counts / counts.sum()


def _luma(a: np.ndarray) -> np.ndarray:
    small = np.asarray(Image.fromarray(a).resize((_SSIM_SIZE, _SSIM_SIZE), Image.Resampling.BOX), np.float64)
    return small @ np.array([0.299, 0.587, 0.114])  # [32, 32], 0..255


def _box_mean(x: np.ndarray, w: int) -> np.ndarray:
    # Means over every w x w window ("valid"), from a summed-area table.
    c = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    c[1:, 1:] = x.cumsum(0).cumsum(1)
    return (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w]) / (w * w)


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
    w = _SSIM_WINDOW
    mx, my = _box_mean(x, w), _box_mean(y, w)
    vx = _box_mean(x * x, w) - mx * mx
    vy = _box_mean(y * y, w) - my * my
    cov = _box_mean(x * y, w) - mx * my
    num = (2 * mx * my + _C1) * (2 * cov + _C2)
    den = (mx * mx + my * my + _C1) * (vx + vy + _C2)
    return float(np.mean(num / den))


class SelfCheck:
    """Scores images against redraws from their caption embeddings with one engine."""

    def __init__(self, engine: Any, options: SelfCheckOptions) -> None:
        diffusion = engine.model.diffusion
        if diffusion is None:
            raise ValueError("the self-check redraws images with the diffusion decoder, and this engine has none "
                             "(a caption-only model, or loaded with load_diffusion=False)")
        if engine.text_tokenizer is None:
            raise ValueError("the self-check needs the text encoder's tokenizer (tokenizer/ folder) for the "
                             "unconditional prompt")
        diffusion.make_scheduler(options.sampler)  # an unknown sampler fails here, before any work
        self.engine = engine
        self.options = options
        self.guidance = (engine.config.diffusion.guidance_scale if options.guidance_scale is None
                         else options.guidance_scale)

    def key(self) -> dict[str, Any]:
        """What the scores depend on besides the image and its embedding (hashed into
        the job's generation hash)."""
        return {"self_check": {**asdict(self.options), "guidance_scale": self.guidance,
                               "metric": METRIC_VERSION, "decoder": self._decoder_revision()}}

    def _decoder_revision(self) -> str:
        from vlv_engine.batch.revision import _hash_modules

        diffusion = self.engine.model.diffusion
        h = hashlib.sha256(b"vlv-self-check-decoder")
        h.update(json.dumps(self.engine.config.to_dict()["diffusion"], sort_keys=True, default=str).encode())
        _hash_modules(h, diffusion.unet, diffusion.vae)
        # The empty prompt's embedding carries the text tokenizer and encoder.
        h.update(self.engine.unconditional_embedding().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def redraw(self, embedding: torch.Tensor) -> np.ndarray:
        """One caption embedding ``[Nq, D]`` -> uint8 ``[H, W, 3]``, alone in its batch."""
        engine = self.engine
        diffusion = engine.model.diffusion
        generator = torch.Generator(device=engine.device).manual_seed(self.options.seed)
        pixels = diffusion.sample(embedding[None].to(engine.device, engine.dtype), engine.unconditional_embedding(),
                                  steps=self.options.steps, guidance_scale=self.guidance, generators=[generator],
                                  scheduler=diffusion.make_scheduler(self.options.sampler))  # [1, 3, H, W]
        # The rounding Engine.reconstruct's images get.
        return (pixels[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()

    def scores(self, embeddings: Sequence[torch.Tensor], originals: Sequence[np.ndarray]) -> list[float]:
        return [fidelity(np.ascontiguousarray(o), self.redraw(e)) for e, o in zip(embeddings, originals)]

    def fields(self, score: float) -> dict[str, Any]:
        """The record fields of one score (``RECORD_COLUMNS``)."""
        return {"self_check_score": score, "self_check_low": score < self.options.threshold}
