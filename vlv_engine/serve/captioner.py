"""What the service asks of the engine: decode an upload, caption a batch.

Decoding runs in the request's own thread (a large photo never occupies the model
thread) and ends with the one resize the engine would make, to the encoder's input
size: the queue holds small images, and the engine's own resize of an image already at
its size is a copy, so a caption from the service equals ``Engine.caption`` of the same
bytes. Batches run on the model thread; images with different generation options are
captioned in separate engine calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlv_engine import images as image_io
from vlv_engine.engine.warm_up import warm_up_sizes

log = logging.getLogger(__name__)

# Generation options as a hashable key: sorted (name, value) pairs.
Options = tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class CaptionJob:
    image: Image.Image  # RGB, already at the encoder's input size
    options: Options = ()


class Captioner:
    def __init__(self, engine, *, max_pixels: int | None):
        self.engine = engine
        self.max_pixels = max_pixels
        size = engine.config.encoder.image_size
        self.size = (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))  # PIL (w, h)

    def prepare(self, data: bytes) -> Image.Image:
        """Encoded bytes -> RGB image at the encoder's size; raises ImageInputError."""
        image = image_io.load_image(data, max_pixels=self.max_pixels)
        # The exact resize of images.preprocess (bicubic, reducing_gap=None).
        return image.resize(self.size, Image.Resampling.BICUBIC, reducing_gap=None)

    def run_batch(self, jobs: list[CaptionJob]) -> list[Any]:
        """On the model thread: one caption (or exception) per job, in order."""
        groups: dict[Options, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.options, []).append(i)
        out: list[Any] = [None] * len(jobs)
        for options, indices in groups.items():
            images = [jobs[i].image for i in indices]
            embeddings = self.engine.embed_loaded(images, batch_size=len(images))  # [b, Nq, D]
            captions = self.engine.caption_embeddings(embeddings, batch_size=len(images), **dict(options))
            for i, caption in zip(indices, captions):
                out[i] = caption
        return out

    def warm_up(self, max_batch_size: int = 1) -> str:
        """Caption blank images before the service says it is ready: first-call costs
        (allocations, caches) are paid up front. An engine that compiles (the compiled
        decoder, the compile or triton encoder backend) compiles, and on CUDA captures, each
        batch bucket on its first use: minutes on a CPU, which would stall the model thread
        under traffic. Such an engine captions one batch per bucket up to `max_batch_size`
        (`vlv_engine.engine.warm_up`). Requests with other generation options (num_beams,
        say) still compile their own steps on first use."""
        blank = Image.new("RGB", self.size, (255, 255, 255))
        caption = ""
        for n in warm_up_sizes(self.engine, max_batch_size):
            start = time.perf_counter()
            caption = self.run_batch([CaptionJob(blank)] * n)[0]
            log.info("warm-up: a batch of %d in %.1f s", n, time.perf_counter() - start)
        return caption

