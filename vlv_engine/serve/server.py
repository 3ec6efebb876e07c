"""Run the service under uvicorn (what `vlv serve` calls)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from vlv_engine.serve.config import ServeConfig


def build_server(config: ServeConfig, *, engine: Any = None, engine_factory: Callable[[], Any] | None = None,
                 host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                 graceful_s: float | None = None):
    """A `uvicorn.Server` for the app. On SIGTERM/SIGINT it stops accepting, waits up to
    `graceful_s` (default: the request timeout plus 5 s) for open requests, then runs the
    app's shutdown, which drains the batcher."""
    import uvicorn

    from vlv_engine.serve.app import create_app

    server = None

    def stop(_message: str) -> None:  # a server without a model has nothing to serve
        if server is not None:
            server.should_exit = True

    app = create_app(engine, engine_factory=engine_factory, config=config, on_load_error=stop)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                               timeout_graceful_shutdown=graceful_s if graceful_s is not None
                               else config.timeout_s + 5.0,
                               access_log=False)
    server = uvicorn.Server(uv_config)
    return server


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready socket (port 0: a free one); pass it to `server.run(sockets=[...])`
    to know the port before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_server(server, sockets: list[socket.socket] | None = None) -> None:
    """Run until SIGTERM / SIGINT, then shut down gracefully and return.

    uvicorn re-raises the signal it caught once it has shut down, so that the process
    dies of it; a handler that ignores it makes a finished graceful shutdown a normal
    return (exit status 0) instead."""
    import signal

    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=sockets)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
