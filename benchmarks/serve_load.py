"""Load test of `vlv serve` on loopback: dynamic batching against batch size 1.

    python benchmarks/serve_load.py [--clients 32] [--seconds 30] [--max-batch-size 32] [--max-delay-ms 10]

For each setting (``--max-batch-size N``, then ``--max-batch-size 1``) it starts a real
server process (``python -m vlv_engine.cli serve``) on a free loopback port with a model
of the ``nano`` preset's architecture and random weights (seed 0: speed does not depend
on the weights, only on caption length; these weights never emit the end token, so
every caption is the nano preset's ``max_new_tokens`` = 40 greedy tokens), waits for
``/readyz``, then runs ``--clients`` concurrent keep-alive connections, each posting one
Shapes World scene (64 px PNG, multipart) at a time, for ``--seconds``. The client
writes prebuilt requests on raw sockets: an HTTP library's per-request CPU would
compete with the server for the same cores. Reported per run: requests/s, p50/p95/p99 latency, errors,
the server's mean batch size (from /metrics) and its peak RSS; then the throughput
ratio of dynamic batching over batch size 1. Both runs share this process's client,
the same machine and whatever else runs on it (stated with the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "vlv_engine" / "assets" / "examples"


def build_nano_random(folder: Path) -> None:
    """Save a nano-architecture model with random weights (caption path only)."""
    import torch

    from vlv_engine import Engine
    from vlv_engine.models import VLVModel
    from vlv_training.recipes.nano import nano_config, tokenizers

    torch.manual_seed(0)
    model = VLVModel.from_config(nano_config(), with_diffusion=False)
    llm_tok, text_tok = tokenizers()
    Engine(model, llm_tokenizer=llm_tok, text_tokenizer=text_tok).save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def multipart_request(port: int, name: str, data: bytes) -> bytes:
    """One complete HTTP/1.1 keep-alive POST /v1/caption of one image, built once."""
    boundary = "vlvbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def load(port: int, images: list[bytes], clients: int, seconds: float):
    """`clients` keep-alive connections, each posting one image at a time. A raw-socket
    client: an HTTP library's per-request CPU would compete with the server for the
    same cores and measure itself."""
    requests = [multipart_request(port, f"{i}.png", d) for i, d in enumerate(images)]
    latencies: list[float] = []
    errors: list[str] = []
    words: set[int] = set()  # caption lengths seen

    async def client(k: int, stop: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                writer.write(requests[i % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = await reader.readexactly(length)
                result = json.loads(body)["results"][0] if status == 200 else {}
                if "caption" in result:
                    latencies.append(time.perf_counter() - t0)
                    words.add(len(result["caption"].split()))
                else:
                    errors.append(f"{status} {body[:120]!r}")
                i += 1
        except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    stop = time.monotonic() + seconds
    await asyncio.gather(*(client(k, stop) for k in range(clients)))
    return latencies, errors, time.perf_counter() - t0, words


def run_one(model: Path, max_batch_size: int, args, images: list[bytes]) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "vlv_engine.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(args.max_delay_ms),
           "--max-queue", str(max(256, 4 * args.clients)), "--timeout-s", "120"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not become ready: {server.stderr.read()}")
            time.sleep(0.1)
        load_before = os.getloadavg()[0]
        latencies, errors, wall, words = asyncio.run(load(port, images, args.clients, args.seconds))
        metrics = httpx.get(base + "/metrics").text
        rss = peak_rss_mib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p / 100 * len(lat))) - 1)] * 1e3 if lat else float("nan")

    batches = metric_sum(metrics, "vlv_batch_size_count")
    return {"max_batch_size": max_batch_size, "requests": len(lat), "errors": len(errors),
            "error_examples": errors[:3], "caption_words": sorted(words), "seconds": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(pct(50), 1), "p95_ms": round(pct(95), 1), "p99_ms": round(pct(99), 1),
            "mean_batch": round(metric_sum(metrics, "vlv_batch_size_sum") / batches, 2) if batches else 0.0,
            "server_peak_rss_mib": round(rss, 1), "server_exit": server.returncode,
            "load_avg_1min_at_start": round(load_before, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=10.0)
    parser.add_argument("--model", help="model folder (default: nano architecture, random weights)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    images = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.png"))]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f} (other jobs share this CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else Path(tmp) / "nano-random"
        if not args.model:
            build_nano_random(model)
        runs = [run_one(model, args.max_batch_size, args, images), run_one(model, 1, args, images)]
    for r in runs:
        print(f"max_batch_size={r['max_batch_size']:>3}: {r['requests_per_s']:7.1f} req/s  "
              f"p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"errors {r['errors']}  caption words {r['caption_words']}  mean batch {r['mean_batch']:.1f}  server peak RSS "
              f"{r['server_peak_rss_mib']:.0f} MiB  exit {r['server_exit']}  (load avg {r['load_avg_1min_at_start']})")
    ratio = runs[0]["requests_per_s"] / runs[1]["requests_per_s"] if runs[1]["requests_per_s"] else float("inf")
    client_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"dynamic batching / batch size 1 throughput: {ratio:.2f}x  (client peak RSS {client_rss:.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "ratio": ratio, "clients": args.clients,
                                               "seconds": args.seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
