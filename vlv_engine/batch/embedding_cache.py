"""A disk cache of caption embeddings, so a new caption decoder or generation setting
re-decodes stored embeddings (``Engine.caption_embeddings``) without re-encoding images.

Layout: ``ROOT/<encoder revision>/emb-<uuid>.safetensors``, each shard holding up to
``shard_size`` embeddings ``[Nq, D]`` (in the engine's dtype, bit for bit) named by
the image's sha256.  The encoder revision (``revision.py``) covers the encoder
weights, the bottleneck, their configs and the dtype, so an embedding is never reused
across encoders, while any decoder shares them.

Shards are written whole (temp file, fsync, rename) and never modified, so a kill
leaves at most the unflushed buffer unwritten (a cache: it is recomputed) and never a
torn shard; many runs may share a cache folder.  The index is rebuilt at start from
the shards' headers (safetensors headers are read without the tensor data).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlv_engine.batch.durable import fsync_dir

__all__ = ["EmbeddingCache"]

log = logging.getLogger(__name__)


class EmbeddingCache:
    def __init__(self, root: str | Path, encoder_revision: str, *, shard_size: int = 1024) -> None:
        self.folder = Path(root) / encoder_revision
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self._index: dict[str, Path] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        for shard in sorted(self.folder.glob("emb-*.safetensors")):
            try:
                with safe_open(str(shard), "pt") as f:
                    self._index.update(dict.fromkeys(f.keys(), shard))
            except Exception as exc:  # a foreign or damaged file costs its entries only
                log.warning("embedding cache: skipping unreadable %s (%s)", shard, exc)

    def __contains__(self, sha: str) -> bool:
        return sha in self._buffer or sha in self._index

    def __len__(self) -> int:
        return len(self._index) + len(self._buffer)

    def get_many(self, shas: Iterable[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[Path, list[str]] = {}
        for sha in shas:
            if sha in self._buffer:
                out[sha] = self._buffer[sha]
            elif sha in self._index:
                by_shard.setdefault(self._index[sha], []).append(sha)
        for shard, keys in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                for key in keys:
                    out[key] = f.get_tensor(key)
        return out

    def put_many(self, embeddings: dict[str, torch.Tensor]) -> None:
        for sha, emb in embeddings.items():
            if sha not in self:
                # A row of a batch tensor shares its storage; safetensors stores
                # tensors, not views, so each gets its own copy.
                self._buffer[sha] = emb.detach().to("cpu", copy=True).contiguous()
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        shard = self.folder / f"emb-{uuid.uuid4().hex}.safetensors"
        tmp = shard.with_name(f".{shard.name}.tmp")
        save_file(self._buffer, str(tmp))
        with open(tmp, "rb+") as fp:
            os.fsync(fp.fileno())
        os.replace(tmp, shard)
        fsync_dir(self.folder)
        self._index.update(dict.fromkeys(self._buffer, shard))
        self._buffer = {}

    def close(self) -> None:
        self.flush()
