"""The inference engine."""

from vlv_engine.engine.engine import Engine, default_model_path
from vlv_engine.engine.results import ItemResult

__all__ = ["Engine", "ItemResult", "default_model_path"]
