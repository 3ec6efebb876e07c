"""Shapes World evaluation: caption accuracy and reconstruction semantics.

Held-out scenes are drawn from their own seed with exact centres and no
augmentation. Captions are scored by parsing them back into (size, color, shape,
position) tuples; reconstructions of single-object scenes are scored by reading
the colour and cell of the object back off the generated image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vlv_engine import shapes

EVAL_SEED = 20_260_000  # disjoint from training seeds, which are small integers


def eval_scenes(n: int, seed: int = EVAL_SEED, num_objects: int | None = None) -> list[shapes.Scene]:
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, num_objects) for _ in range(n)]


@dataclass
class ShapesReport:
    caption: dict[str, float]
    caption_single: dict[str, float]
    caption_double: dict[str, float]
    reconstruction: dict[str, float] | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"caption": self.caption, "caption_single": self.caption_single,
                "caption_double": self.caption_double, "reconstruction": self.reconstruction,
                "examples": self.examples}


def evaluate_captions(engine, scenes: list[shapes.Scene], *, batch_size: int = 32, **generation: Any):
    images = [shapes.render(s) for s in scenes]
    captions = engine.caption(images, batch_size=batch_size, **generation)
    return captions


def reconstruction_accuracy(engine, scenes: list[shapes.Scene], *, steps: int | None = None,
                            guidance_scale: float | None = None, seed: int = 0,
                            batch_size: int = 16, sampler: str | None = None) -> dict[str, float]:
    """Fraction of single-object scenes whose reconstruction shows the right colour and cell."""
    if any(len(s) != 1 for s in scenes):
        raise ValueError("reconstruction accuracy is defined on single-object scenes")
    recon = engine.reconstruct([shapes.render(s) for s in scenes], steps=steps, guidance_scale=guidance_scale,
                               seed=seed, batch_size=batch_size, sampler=sampler)
    color_ok = cell_ok = both_ok = 0
    for scene, image in zip(scenes, recon):
        if image.size != (shapes.CANVAS, shapes.CANVAS):
            image = image.resize((shapes.CANVAS, shapes.CANVAS), Image.Resampling.BILINEAR)
        got = shapes.read_back(np.asarray(image))
        obj = scene[0]
        c = got is not None and got[0] == obj.color
        p = got is not None and (got[1], got[2]) == (obj.row, obj.col)
        color_ok += c
        cell_ok += p
        both_ok += c and p
    n = len(scenes)
    return {"color_and_cell": both_ok / n, "color": color_ok / n, "cell": cell_ok / n, "n": float(n)}


def scene_read_back_accuracy(images, scenes: list[shapes.Scene]) -> dict[str, float]:
    """How well generated images show their scenes, read back as (colour, cell) sets:
    the share of images whose set is exactly right, and object precision and recall."""
    exact = tp = n_pred = n_true = 0
    for scene, image in zip(scenes, images, strict=True):
        arr = np.asarray(image)
        if arr.shape[:2] != (shapes.CANVAS, shapes.CANVAS):
            arr = np.asarray(Image.fromarray(arr).resize((shapes.CANVAS, shapes.CANVAS), Image.Resampling.BILINEAR))
        got = shapes.read_back_objects(arr)
        truth = frozenset((o.color, o.row, o.col) for o in scene)
        exact += got == truth
        tp += len(got & truth)
        n_pred += len(got)
        n_true += len(truth)
    n = len(scenes)
    return {"exact": exact / n, "precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_true,
            "n": float(n)}


def evaluate_shapes(engine, *, num: int = 500, seed: int = EVAL_SEED, recon_num: int = 100,
                    steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                    batch_size: int = 32, num_examples: int = 8, **generation: Any) -> ShapesReport:
    scenes = eval_scenes(num, seed)
    captions = evaluate_captions(engine, scenes, batch_size=batch_size, **generation)
    single = [i for i, s in enumerate(scenes) if len(s) == 1]
    double = [i for i, s in enumerate(scenes) if len(s) == 2]
    report = ShapesReport(
        caption=shapes.score(captions, scenes),
        caption_single=shapes.score([captions[i] for i in single], [scenes[i] for i in single]),
        caption_double=shapes.score([captions[i] for i in double], [scenes[i] for i in double]),
        examples=[{"truth": shapes.caption(s), "caption": c} for s, c in zip(scenes[:num_examples], captions)],
    )
    if recon_num and engine.model.diffusion is not None:
        recon_scenes = eval_scenes(recon_num, seed + 1, num_objects=1)
        report.reconstruction = reconstruction_accuracy(engine, recon_scenes, steps=steps,
                                                        guidance_scale=guidance_scale, batch_size=batch_size,
                                                        sampler=sampler)
    return report
