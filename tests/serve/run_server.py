"""A real `vlv serve`-like process for tests: tiny engine, optional delay per batch.

Prints {"port": N} on stdout once listening is possible, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from serve_helpers import SlowEngine

from vlv_engine.serve import ServeConfig
from vlv_engine.serve.server import bind_socket, build_server, run_server
from vlv_engine.testing import tiny_engine


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--max-batch-size", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    engine = SlowEngine(tiny_engine(seed=0, with_diffusion=False), delay=args.delay)  # the warm-up too
    sock = bind_socket("127.0.0.1", 0)
    server = build_server(ServeConfig(max_batch_size=args.max_batch_size, max_delay_ms=0),
                          engine_factory=lambda: engine, log_level="info")
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    run_server(server, sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
