"""Each hostile image kind gets its own 4xx naming the reason; odd but valid images
are captioned; in a mixed request the good images keep their captions."""

from __future__ import annotations

import base64

import pytest
from serve_helpers import HOSTILE, ODD_BUT_VALID, files, noise_png, wait_ready
from starlette.testclient import TestClient

from vlv_engine.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, config=ServeConfig(max_images=16, max_delay_ms=1))
    with TestClient(app) as c:
        wait_ready(c.get)
        yield c


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_image_alone_gets_its_status_and_reason(client, name):
    data, status, reason = HOSTILE[name]
    r = client.post("/v1/caption", files=files((name, data)))
    assert r.status_code == status, r.text
    body = r.json()
    assert body["reason"] == reason
    assert name in body["error"]  # the message names the upload
    assert body["results"] == [{"index": 0, "name": name, "error": body["error"], "reason": reason,
                                "status": status}]


def test_bomb_is_refused_from_the_header_fast(client):
    import time

    t0 = time.perf_counter()
    r = client.post("/v1/caption", files=files(("bomb.png", HOSTILE["bomb.png"][0])))
    assert r.status_code == 413
    assert time.perf_counter() - t0 < 2.0  # 10 G pixels were never decoded


def test_mixed_request_captions_the_good_images_and_reports_each_bad_one(client, engine):
    good = [("good0.png", noise_png(0)), ("good1.png", noise_png(1))]
    named = [good[0], *[(n, HOSTILE[n][0]) for n in sorted(HOSTILE)], good[1],
             *sorted(ODD_BUT_VALID.items())]
    r = client.post("/v1/caption", files=files(*named))
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["name"] for x in results] == [n for n, _ in named]
    assert body["failed"] == len(HOSTILE) and body["captioned"] == 2 + len(ODD_BUT_VALID)
    valid = [(name, data) for name, data in named if name not in HOSTILE]
    want = dict(zip((n for n, _ in valid), engine.caption([d for _, d in valid])))
    for (name, _data), res in zip(named, results):
        if name in HOSTILE:
            _, status, reason = HOSTILE[name]
            assert (res["status"], res["reason"]) == (status, reason), res
            assert "caption" not in res
        else:
            assert res["caption"] == want[name], name


def test_all_bad_with_different_reasons_is_a_400_listing_each(client):
    named = [("zero.png", b""), ("text.png", HOSTILE["text.png"][0])]
    r = client.post("/v1/caption", files=files(*named))
    assert r.status_code == 400
    body = r.json()
    assert body["reason"] == "bad_images" and "none of the 2 images" in body["error"]
    assert [x["reason"] for x in body["results"]] == ["empty_image", "not_an_image"]


def test_hostile_base64_entries_are_per_item(client, engine):
    good = noise_png(5)
    doc = {"images": [base64.b64encode(good).decode(), "***not base64***", 42,
                      {"data": base64.b64encode(HOSTILE["truncated.png"][0]).decode(), "name": "t.png"},
                      "data:image/png;base64," + base64.b64encode(good).decode()]}
    r = client.post("/v1/caption", json=doc)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["caption"] == engine.caption([good])[0] == res[4]["caption"]
    assert (res[1]["status"], res[1]["reason"]) == (400, "invalid_base64")
    assert (res[2]["status"], res[2]["reason"]) == (400, "invalid_image_field")
    assert (res[3]["status"], res[3]["reason"], res[3]["name"]) == (400, "corrupt_image", "t.png")


def test_smaller_pixel_limit_is_the_service_setting(engine):
    app = create_app(engine, config=ServeConfig(max_pixels=1000))
    with TestClient(app) as c:
        wait_ready(c.get)
        r = c.post("/v1/caption", files=files(("a.png", noise_png(0, (40, 30))), ("b.png", noise_png(1, (20, 20)))))
    assert r.status_code == 200
    a, b = r.json()["results"]
    assert (a["status"], a["reason"]) == (413, "too_many_pixels") and "max_pixels=1,000" in a["error"]
    assert "caption" in b  # 400 pixels: under the limit
