"""The HTTP API: captions, options, limits, errors, health, readiness, metrics."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from serve_helpers import SlowEngine, files, noise_png, png, wait_ready
from starlette.testclient import TestClient

from vlv_engine.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, config=ServeConfig(max_images=4, max_body_mb=1, max_delay_ms=1, max_num_beams=4,
                                                max_new_tokens_limit=20))
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


def test_multipart_captions_equal_engine_caption(client, engine):
    images = [noise_png(i, (30 + 9 * i, 40)) for i in range(3)]
    r = client.post("/v1/caption", files=files(*[(f"im{i}.png", d) for i, d in enumerate(images)]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["captioned"] == 3 and body["failed"] == 0
    assert [x["caption"] for x in body["results"]] == engine.caption(images)
    assert [x["index"] for x in body["results"]] == [0, 1, 2]


def test_json_base64_with_options_equals_engine_caption(client, engine):
    images = [noise_png(10), noise_png(11)]
    doc = {"images": [base64.b64encode(d).decode() for d in images],
           "options": {"num_beams": 2, "max_new_tokens": 5}}
    r = client.post("/v1/caption", json=doc)
    assert r.status_code == 200, r.text
    got = [x["caption"] for x in r.json()["results"]]
    assert got == engine.caption(images, num_beams=2, max_new_tokens=5)
    assert got != engine.caption(images) or all(len(c.split()) <= 5 for c in got)


def test_form_fields_and_options_json_field_are_options(client, engine):
    image = noise_png(12)
    r1 = client.post("/v1/caption", files=files(("a.png", image)), data={"max_new_tokens": "3", "postprocess": "true"})
    r2 = client.post("/v1/caption", files=files(("a.png", image)), data={"options": json.dumps({"max_new_tokens": 3})})
    want = engine.caption([image], max_new_tokens=3, postprocess=True)[0]
    assert r1.json()["results"][0]["caption"] == want
    assert r2.json()["results"][0]["caption"] == engine.caption([image], max_new_tokens=3)[0]


@pytest.mark.parametrize("options, needle", [
    ({"num_beams": 5}, "'num_beams' must be an integer in [1, 4]"),
    ({"num_beams": 0}, "in [1, 4]"),
    ({"num_beams": 2.5}, "an integer"),
    ({"num_beams": True}, "an integer"),
    ({"max_new_tokens": 21}, "in [1, 20]"),
    ({"length_penalty": float("inf")}, "a number in [-10, 10]"),  # Python's json reads "Infinity"
    ({"early_stopping": "maybe"}, "true or false"),
    ({"temperature": 0.7}, "unknown option 'temperature'"),
])
def test_bad_options_are_422_naming_the_option(client, options, needle):
    body = json.dumps({"images": [base64.b64encode(png()).decode()], "options": options})
    r = client.post("/v1/caption", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "invalid_option" and needle in r.json()["error"]


def test_bad_form_option_is_422(client):
    r = client.post("/v1/caption", files=files(("a.png", png())), data={"num_beams": "many"})
    assert r.status_code == 422 and "'num_beams'" in r.json()["error"]
    r = client.post("/v1/caption", files=files(("a.png", png())), data={"options": "{not json"})
    assert r.status_code == 400 and r.json()["reason"] == "invalid_json"
    r = client.post("/v1/caption", files=files(("a.png", png())), data={"options": "[1, 2]"})
    assert r.status_code == 422 and "JSON object" in r.json()["error"]


@pytest.mark.parametrize("kwargs, status, reason", [
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"content": b"hello"}, 415, "unsupported_media_type"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    ({"json": {"images": "x"}}, 422, "invalid_request"),
    ({"json": {"images": [], "extra": 1}}, 422, "invalid_request"),
    ({"json": {"images": []}}, 400, "no_images"),
    ({"data": {"num_beams": "2"}}, 415, "unsupported_media_type"),  # a form without files is urlencoded
    ({"content": b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n",
      "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400, "invalid_multipart"),
    ({"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, "invalid_multipart"),
])
def test_malformed_requests_are_clear_4xx(client, kwargs, status, reason):
    r = client.post("/v1/caption", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason and r.json()["error"]


def test_deep_json_nesting_is_a_400_not_a_crash(client):
    deep = b'{"images": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    r = client.post("/v1/caption", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["reason"] == "invalid_json" and "nested too deeply" in r.json()["error"]
    r = client.post("/v1/caption", files=files(("a.png", png())), data={"options": "[" * 200_000})
    assert r.status_code == 400 and r.json()["reason"] == "invalid_json"


def test_too_many_json_entries_are_refused_before_any_is_decoded(client, monkeypatch):
    """A small body can hold millions of tiny entries: the count is checked first."""
    import vlv_engine.serve.parsing as parsing

    decoded = []
    real = parsing._decode_entry
    monkeypatch.setattr(parsing, "_decode_entry", lambda i, e: decoded.append(i) or real(i, e))
    r = client.post("/v1/caption", content=b'{"images": [' + b",".join([b"0"] * 100_000) + b"]}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["reason"] == "too_many_images" and "100000 images" in r.json()["error"]
    assert decoded == []


def test_a_long_image_name_is_cut_in_results_and_errors(client):
    from vlv_engine.serve.parsing import MAX_NAME_CHARS

    name = "n" * 100_000
    r = client.post("/v1/caption", json={"images": [{"name": name, "data": "!!"}]})
    assert r.status_code == 400
    result = r.json()["results"][0]
    assert result["name"] == name[:MAX_NAME_CHARS] and len(r.content) < 4 * MAX_NAME_CHARS + 1000


def test_too_many_images_is_413(client):
    r = client.post("/v1/caption", files=files(*[(f"{i}.png", png()) for i in range(5)]))
    assert r.status_code == 413 and r.json()["reason"] == "too_many_images"
    r = client.post("/v1/caption", json={"images": [base64.b64encode(png()).decode()] * 5})
    assert r.status_code == 413 and "limit is 4" in r.json()["error"]
    r = client.post("/v1/caption", files=files(*[(f"{i}.png", png()) for i in range(9)]))
    assert r.status_code == 413 and r.json()["reason"] == "too_many_images"


def test_body_over_the_limit_is_refused_before_it_is_read(client):
    r = client.post("/v1/caption", content=b"x" * (2 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    read = []

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(64):
            read.append(1)
            yield b"y" * 65536

    r = client.post("/v1/caption", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large" and "1 MiB" in r.json()["error"]


def test_unknown_path_and_method_are_json_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["reason"] == "not_found"
    r = client.get("/v1/caption")
    assert r.status_code == 405 and r.json()["reason"] == "method_not_allowed"


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    client.post("/v1/caption", files=files(("ok.png", png()), ("bad.png", b"junk")))
    client.post("/v1/caption", files=files(("ok.png", png())), data={"num_beams": "0"})
    text = client.get("/metrics").text
    for name in ("vlv_requests_total", "vlv_request_latency_seconds_bucket", "vlv_batch_size_bucket",
                 "vlv_queue_depth", "vlv_images_captioned_total", "vlv_ready 1.0"):
        assert name in text, name
    assert 'vlv_image_failures_total{reason="not_an_image"}' in text
    assert 'vlv_requests_total{path="/v1/caption",status="200"}' in text
    assert 'vlv_requests_total{path="/v1/caption",status="413"}' in text  # the body limit's own answers
    assert 'vlv_request_errors_total{reason="invalid_option"}' in text


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_images_captioned_counter_counts_images(client):
    before = _metric(client.get("/metrics").text, "vlv_images_captioned_total")
    client.post("/v1/caption", files=files(("a.png", png()), ("b.png", png((1, 2, 3)))))
    assert _metric(client.get("/metrics").text, "vlv_images_captioned_total") == before + 2


def test_readiness_waits_for_the_model_and_failed_load_is_reported(engine):
    gate = threading.Event()

    def factory():
        assert gate.wait(10)
        return engine

    app = create_app(engine_factory=factory, config=ServeConfig())
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "loading"
        r = c.post("/v1/caption", files=files(("a.png", png())))
        assert r.status_code == 503 and r.json()["reason"] == "not_ready" and r.headers["retry-after"] == "1"
        gate.set()
        wait_ready(c.get)

    def broken():
        raise OSError("no such model folder")

    errors = []
    app = create_app(engine_factory=broken, on_load_error=errors.append)
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert errors == ["OSError: no such model folder"]
        assert c.get("/healthz").status_code == 503
        r = c.get("/readyz")
        assert r.status_code == 503 and "no such model folder" in r.json()["error"]


class _ModelThreadBroke(BaseException):
    """Not an Exception: what no batch isolation catches."""


def test_a_dead_model_thread_makes_health_fail_instead_of_serving_nothing(engine):
    broken = SlowEngine(engine)
    app = create_app(broken, config=ServeConfig(max_delay_ms=1))
    with TestClient(app) as c:
        wait_ready(c.get)

        def fatal(embeddings, **kwargs):
            raise _ModelThreadBroke("the model thread broke")

        broken.caption_embeddings = fatal
        r = c.post("/v1/caption", files=files(("a.png", png())))
        assert r.status_code == 503 and r.json()["reason"] == "worker_died", r.text
        assert "_ModelThreadBroke" in r.json()["error"]
        for path in ("/healthz", "/readyz"):  # an orchestrator restarts it
            r = c.get(path)
            assert r.status_code == 503 and r.json()["reason"] == "worker_died"
        r = c.post("/v1/caption", files=files(("a.png", png())))
        assert r.status_code == 503 and r.json()["reason"] == "worker_died"


def test_request_timeout_is_504(engine):
    slow = SlowEngine(engine)
    app = create_app(slow, config=ServeConfig(timeout_s=0.3, max_delay_ms=0))
    with TestClient(app) as c:
        wait_ready(c.get)
        slow.delay = 1.0
        t0 = time.perf_counter()
        r = c.post("/v1/caption", files=files(("a.png", png())))
        assert r.status_code == 504 and r.json()["reason"] == "timeout" and "0.3 s" in r.json()["error"]
        assert time.perf_counter() - t0 < 0.9  # answered at the timeout, not when the model finished
        slow.delay = 0.0


def test_full_queue_is_503_with_retry_after(engine):
    slow = SlowEngine(engine)
    app = create_app(slow, config=ServeConfig(max_batch_size=1, max_queue=1, max_images=1, max_delay_ms=0))
    with TestClient(app) as c:
        wait_ready(c.get)
        slow.delay, slow.entered = 0.6, threading.Event()
        state = app.state.service
        answers = {}

        def post(key):
            answers[key] = c.post("/v1/caption", files=files((f"{key}.png", png())))

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert slow.entered.wait(10)  # "first" is on the model thread
        second = threading.Thread(target=post, args=("second",))
        second.start()
        deadline = time.monotonic() + 10
        while state.batcher.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        r = c.post("/v1/caption", files=files(("third.png", png())))
        first.join()
        second.join()
        slow.delay = 0.0
    assert r.status_code == 503 and r.json()["reason"] == "overloaded" and r.headers["retry-after"] == "1"
    assert answers["first"].status_code == 200 and answers["second"].status_code == 200


def test_dynamic_batching_batches_concurrent_requests(engine):
    slow = SlowEngine(engine)
    app = create_app(slow, config=ServeConfig(max_batch_size=8, max_delay_ms=50))
    with TestClient(app) as c:
        wait_ready(c.get)
        slow.batch_sizes.clear()
        threads = [threading.Thread(target=c.post, args=("/v1/caption",),
                                    kwargs={"files": files((f"{i}.png", noise_png(i)))}) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
    assert sum(slow.batch_sizes) == 6
    assert max(slow.batch_sizes) >= 2  # six requests within 50 ms share batches
    assert _metric(metrics, "vlv_batch_size_count") == len(slow.batch_sizes)  # (the warm-up is not served)


def test_create_app_needs_exactly_one_engine_source(engine):
    with pytest.raises(ValueError, match="exactly one"):
        create_app()
    with pytest.raises(ValueError, match="exactly one"):
        create_app(engine, engine_factory=lambda: engine)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(max_queue=2, max_images=4)
    with pytest.raises(ValueError, match="timeout_s"):
        ServeConfig(timeout_s=0)
    with pytest.raises(ValueError, match="torch_threads"):
        ServeConfig(torch_threads=0)


def test_torch_threads_setting_reaches_the_model_thread(engine):
    import torch

    assert torch.get_num_threads() == 1  # this directory's fixture
    app = create_app(engine, config=ServeConfig(torch_threads=2))
    with TestClient(app) as c:
        wait_ready(c.get)
        batcher = app.state.service.batcher
        in_worker = c.portal.call(batcher.run_in_worker, torch.get_num_threads)
        c.portal.call(batcher.run_in_worker, lambda: torch.set_num_threads(1))  # the module's setting again
    assert in_worker == 2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_warm_up_reaches_every_bucket_of_an_engine_that_compiles(engine, compiled):
    """A compiled engine builds each batch bucket on first use (minutes on a CPU): the
    service pays that before it is ready, not in the middle of traffic."""
    from vlv_engine.engine.warm_up import warm_up_sizes

    slow = SlowEngine(engine)
    if compiled:
        slow.decoder = "compiled"  # what the engine reports; the model stays the tiny eager one
    app = create_app(slow, config=ServeConfig(max_batch_size=6))
    with TestClient(app) as c:
        wait_ready(c.get)
        assert slow.batch_sizes == ([1, 2, 4, 6] if compiled else [1])
        r = c.post("/v1/caption", files=files(("a.png", png())))
        assert r.status_code == 200
    # Past the largest bucket, a batch runs in chunks of it: warming up to it covers all.
    slow.decoder = "compiled"
    assert warm_up_sizes(slow, 100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert warm_up_sizes(slow, 1) == [1]
    slow.decoder, slow.encoder_backend = "static", type("Choice", (), {"name": "compile"})()
    assert warm_up_sizes(slow, 8) == [1, 2, 4, 8]
