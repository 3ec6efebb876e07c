"""The model's part of a batch: decoded pixels in, finished results out.

Embeddings come from the embedding cache or the image encoder, captions from the
caption decoder, each halving its batch on out-of-memory (``oom.py``), and with the
self-check on, each image is redrawn and scored (``selfcheck.py``).  The local runner
calls it in its own process; on Ray every engine actor holds one (``ray_runner.py``),
so both paths compute results with the same code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlv_engine.batch.embedding_cache import EmbeddingCache
from vlv_engine.batch.manifest import DONE, Result
from vlv_engine.batch.oom import AdaptiveBatch
from vlv_engine.batch.selfcheck import SelfCheck

__all__ = ["ModelStage"]


class ModelStage:
    def __init__(self, engine: Any, generation: dict[str, Any], batch_size: int, *,
                 cache: EmbeddingCache | None = None, self_check: SelfCheck | None = None) -> None:
        self.engine = engine
        self.generation = generation
        self.cache = cache
        self.self_check = self_check
        self.encode_batch = AdaptiveBatch(batch_size)
        self.decode_batch = AdaptiveBatch(batch_size)

    def needs_pixels(self, sha: str | None) -> bool:
        """Whether an item must be read and decoded: always for the self-check (it
        compares with the image), else unless its embedding is cached."""
        return self.self_check is not None or not (sha is not None and self.cache is not None and sha in self.cache)

    def results(self, keys: Sequence[str], pixels: dict[str, np.ndarray]) -> list[Result]:
        """One ``DONE`` result per content key; ``pixels`` holds ``uint8 [S, S, 3]`` for
        every key whose embedding is not cached (and for every key with the self-check)."""
        if not keys:
            return []
        embeddings: dict[str, torch.Tensor] = self.cache.get_many(keys) if self.cache is not None else {}
        missing = [k for k in keys if k not in embeddings]
        if missing:
            fresh = self.encode_batch.run(self._encode, [pixels[k] for k in missing])
            embeddings.update(zip(missing, fresh))
            if self.cache is not None:
                self.cache.put_many({k: embeddings[k] for k in missing})
        captions = self.decode_batch.run(self._decode, [embeddings[k] for k in keys])
        if self.self_check is None:
            return [Result(DONE, caption=c) for c in captions]
        scores = self.self_check.scores([embeddings[k] for k in keys], [pixels[k] for k in keys])
        return [Result(DONE, caption=c, extra=json.dumps(self.self_check.fields(s), sort_keys=True))
                for c, s in zip(captions, scores)]

    def _encode(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        images = [Image.fromarray(a) for a in arrays]
        return list(self.engine.embed_loaded(images, batch_size=len(images)))  # each [Nq, D]

    def _decode(self, embeddings: Sequence[torch.Tensor]) -> list[str]:
        stacked = torch.stack(list(embeddings))  # [b, Nq, D]
        return self.engine.caption_embeddings(stacked, batch_size=len(embeddings), **self.generation)
