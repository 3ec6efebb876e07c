"""Graceful shutdown: the server stops accepting, finishes the request on the model and
the one queued behind it, then stops. In a thread (fast, the signal handler's flag set
directly) and as a real process sent SIGTERM (slow: a fresh interpreter imports torch)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import SlowEngine, files, live_server, noise_png, wait_ready

from vlv_engine.serve import ServeConfig

SCRIPT = Path(__file__).with_name("run_server.py")


def _in_flight(base: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("vlv_requests_in_flight "):
            return float(line.split()[-1])
    return 0.0


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return False
    except OSError:
        return True


def test_shutdown_finishes_in_flight_requests_in_process(engine):
    want = engine.caption([noise_png(0), noise_png(1)])
    slow = SlowEngine(engine)
    with live_server(slow, ServeConfig(max_batch_size=1, max_delay_ms=0)) as (server, base, thread):
        wait_ready(lambda path: httpx.get(base + path))
        slow.delay = 0.5
        answers = {}

        def post(i):
            answers[i] = httpx.post(base + "/v1/caption", files=files((f"{i}.png", noise_png(i))), timeout=30)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while _in_flight(base) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _in_flight(base) >= 3
        port = int(base.rsplit(":", 1)[1])
        server.should_exit = True  # what uvicorn's SIGTERM handler does
        deadline = time.monotonic() + 3
        while not _refuses(port) and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = _refuses(port)
        for t in threads:
            t.join(30)
        thread.join(30)
        stopped = not thread.is_alive()
        state = server.config.app.state.service
    assert refused
    assert [answers[i].status_code for i in range(2)] == [200, 200]
    assert [answers[i].json()["results"][0]["caption"] for i in range(2)] == want
    assert stopped and state.draining and not state.batcher.accepting


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits(engine):
    want = engine.caption([noise_png(0), noise_png(1)])
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--delay", "2.0", "--max-batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        base = f"http://127.0.0.1:{port}"
        wait_ready(lambda path: httpx.get(base + path), timeout=60)
        answers = {}

        def post(i):
            answers[i] = httpx.post(base + "/v1/caption", files=files((f"{i}.png", noise_png(i))), timeout=30)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        # Both requests are inside the server (the /metrics call itself counts as one).
        while _in_flight(base) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _in_flight(base) >= 3
        os.kill(proc.pid, signal.SIGTERM)
        t_term = time.monotonic()
        deadline = time.monotonic() + 3
        while not _refuses(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        refused_after = time.monotonic() - t_term
        for t in threads:
            t.join(30)
        code = proc.wait(30)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert refused_after < 2.0  # new connections refused while the old ones were still being answered
    assert code == 0, err
    assert [answers[i].status_code for i in range(2)] == [200, 200]
    assert [answers[i].json()["results"][0]["caption"] for i in range(2)] == want
    assert "batcher drained" in err or "Finished server process" in err


def _metric(base: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(base + "/metrics").text.splitlines()
               if line.startswith(prefix))


_PART = (b'--x\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
         + b"\x89PNG" * 250)


@pytest.mark.parametrize("kind,start", [("application/json", b"{" * 1000),
                                        ("multipart/form-data; boundary=x", _PART)], ids=["json", "multipart"])
def test_a_client_that_leaves_mid_upload_is_no_server_error(engine, kind, start, caplog):
    """Counted as 499 client_disconnected, not as a 500 with a traceback in the log: a
    client going away is not the service failing (error-rate alerts read the 5xx)."""
    with live_server(engine, ServeConfig(max_delay_ms=1)) as (_server, base, _thread):
        wait_ready(lambda path: httpx.get(base + path))
        port = int(base.rsplit(":", 1)[1])
        with caplog.at_level("ERROR"):
            for _ in range(2):
                conn = socket.create_connection(("127.0.0.1", port))
                conn.sendall(f"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                             f"Content-Length: 100000\r\n\r\n".encode() + start)
                time.sleep(0.2)
                conn.close()
            deadline = time.monotonic() + 10
            while _metric(base, 'vlv_request_errors_total{reason="client_disconnected"}') < 2 \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
        assert _metric(base, 'vlv_request_errors_total{reason="client_disconnected"}') == 2
        assert _metric(base, 'vlv_requests_total{path="/v1/caption",status="500"}') == 0
        assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
