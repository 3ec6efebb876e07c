"""vlv-engine: caption images through a text-to-image model's language space (VLV).

Importing this package loads no model, touches no GPU, changes no global state and
imports no heavy library: the public names below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "vlv_engine.engine",
    "ItemResult": "vlv_engine.engine",
    "ImageInputError": "vlv_engine.images",
    "VLVConfig": "vlv_engine.config",
    "preset": "vlv_engine.config",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from vlv_engine.config import VLVConfig, preset
    from vlv_engine.engine import Engine, ItemResult
    from vlv_engine.images import ImageInputError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlv_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
