"""Helpers shared by the batch captioner tests (images made on the fly, JSONL reading)."""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

# Short greedy captions keep every run in these tests well under a second.
GEN = {"num_beams": 1, "max_new_tokens": 6}


def make_images(folder: Path, n: int, *, seed: int = 0, prefix: str = "img", suffix: str = ".png") -> list[Path]:
    """n small random RGB images of varied sizes, named so that sorting keeps their order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(8, 24)), int(rng.integers(8, 24))
        path = folder / f"{prefix}{i:04d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def captions_by_id(path: Path) -> dict[str, str]:
    records = read_jsonl(path)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an item has two records"
    return {r["id"]: r["caption"] for r in records}


def crash_on_marker(tasks, size, max_pixels):
    """A decode batch function that kills its worker on a file named CRASH, as a
    decoder segfaulting on a hostile file would.  It lives here, not in a test module,
    so that spawned workers unpickling it do not import torch."""
    from vlv_engine.batch.decode import decode_batch

    if any("CRASH" in t.source.path for t in tasks):
        os._exit(3)
    return decode_batch(tasks, size, max_pixels)


class CrashingEngineWorker:
    """Stands in for ``ray_runner.EngineWorker`` in Ray actor-pool tests: each item's
    outcome is its path, and a batch holding a file named CRASH kills the actor
    process, as a decoder segfaulting on a hostile file would.  Shipped to Ray by
    value (see test_ray), so workers need not import this module."""

    def run(self, tasks):
        from vlv_engine.batch.ray_runner import Outcome

        if any("CRASH" in t.source.path for t in tasks):
            os._exit(3)
        return [Outcome(t.source.path) for t in tasks]
