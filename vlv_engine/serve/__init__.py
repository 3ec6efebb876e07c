"""`vlv serve`: an HTTP captioning service with dynamic batching (needs the `serve`
extra: ``pip install -e ".[serve]"``).

The batcher and the settings import without the web stack; ``create_app`` and
``build_server`` import FastAPI / uvicorn when called.
"""

from __future__ import annotations

from vlv_engine.serve.batcher import DynamicBatcher, QueueFull, RequestTimeout, ShuttingDown
from vlv_engine.serve.config import ServeConfig

__all__ = ["DynamicBatcher", "QueueFull", "RequestTimeout", "ServeConfig", "ShuttingDown", "build_server",
           "create_app"]


def create_app(*args, **kwargs):
    from vlv_engine.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def build_server(*args, **kwargs):
    from vlv_engine.serve.server import build_server as _build_server

    return _build_server(*args, **kwargs)
