"""Production batch captioning: exactly once, resumable, hostile-input proof.

``caption_dataset(engine, inputs, JobOptions(out=...))`` is the API; ``vlv caption``
is a thin layer over it.  Modules: ``inputs`` (what to caption), ``decode`` (worker
processes), ``oom`` (batch-size search), ``embedding_cache``, ``revision`` (what a
caption depends on), ``manifest`` (what is done), ``jsonl`` / ``outputs`` (where
captions go), ``plan`` and ``runner`` (the job).

Importing this package imports neither torch nor the model code: decode workers
import ``vlv_engine.batch.decode`` and must start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "caption_dataset": "vlv_engine.batch.runner",
    "JobOptions": "vlv_engine.batch.options",
    "RunSummary": "vlv_engine.batch.options",
    "UsageError": "vlv_engine.batch.options",
    "Item": "vlv_engine.batch.inputs",
    "InputSpecError": "vlv_engine.batch.inputs",
    "collect_items": "vlv_engine.batch.inputs",
    "iter_items": "vlv_engine.batch.inputs",
    "OutputError": "vlv_engine.batch.outputs",
    "ManifestError": "vlv_engine.batch.manifest",
    "EmbeddingCache": "vlv_engine.batch.embedding_cache",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from vlv_engine.batch.embedding_cache import EmbeddingCache
    from vlv_engine.batch.inputs import InputSpecError, Item, collect_items, iter_items
    from vlv_engine.batch.manifest import ManifestError
    from vlv_engine.batch.options import JobOptions, RunSummary, UsageError
    from vlv_engine.batch.outputs import OutputError
    from vlv_engine.batch.runner import caption_dataset


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlv_engine.batch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
