"""Self-check: the fidelity metric, and scores written, flagged and resumed by the batch job."""

import sqlite3

import numpy as np
import pytest
from batch_helpers import GEN, captions_by_id, make_images, read_jsonl
from PIL import Image

from vlv_engine import shapes
from vlv_engine.batch import JobOptions, UsageError, caption_dataset
from vlv_engine.batch.decode import DecodeTask, decode_one
from vlv_engine.batch.inputs import FileSource
from vlv_engine.batch.manifest import Manifest
from vlv_engine.batch.selfcheck import SelfCheckOptions, fidelity

CHECK = SelfCheckOptions(steps=2, threshold=0.5)


# ---------------------------------------------------------------- the metric


def _scenes(n, seed):
    return [image for image, _ in shapes.make_dataset(n, seed)]


def test_identical_images_score_one_and_scores_stay_in_range():
    rng = np.random.default_rng(0)
    images = _scenes(4, 1) + [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((7, 9), (64, 31))]
    for a in images:
        assert fidelity(a, a) == 1.0
        for b in images:
            assert 0.0 <= fidelity(a, b) <= 1.0
    assert fidelity(images[0], np.zeros((5, 5, 3), np.uint8)) < 0.5


def test_a_close_redraw_scores_higher_than_another_scene():
    rng = np.random.default_rng(2)
    scenes = _scenes(6, 7)
    for i, a in enumerate(scenes):
        noisy = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
        blurred = np.asarray(Image.fromarray(noisy).resize((32, 32)).resize((64, 64)))
        other = scenes[(i + 1) % len(scenes)]
        assert fidelity(a, blurred) > fidelity(a, other) + 0.05
        assert fidelity(a, blurred) > 0.6


def test_fidelity_refuses_what_is_not_an_rgb_image():
    with pytest.raises(ValueError, match="redrawn image must be uint8"):
        fidelity(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        SelfCheckOptions(threshold=2.0)


# ---------------------------------------------------------------- the batch job


@pytest.fixture(scope="module")
def full_engine():
    """The tiny engine with its diffusion decoder (the shared one has none)."""
    from vlv_engine.testing import tiny_engine

    return tiny_engine(seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), 7, seed=11)


def _run(engine, inputs, out, **kw):
    kw.setdefault("generation", GEN)
    kw.setdefault("workers", 0)
    kw.setdefault("self_check", CHECK)
    return caption_dataset(engine, [str(i) for i in inputs], JobOptions(out=out, **kw))


def test_records_carry_scores_equal_to_reconstruct(full_engine, images, tmp_path):
    out = tmp_path / "o.jsonl"
    summary = _run(full_engine, images, out, batch_size=3)
    records = read_jsonl(out)
    assert summary.captioned == len(images) and len(records) == len(images)
    assert [r["caption"] for r in records] == full_engine.caption(images, **GEN)  # the check changes no caption
    for path, record in zip(images, records):
        assert set(record) == {"id", "path", "caption", "sha256", "model", "gen", "self_check_score",
                               "self_check_low"}
        # The score is the metric between the encoder's input and Engine.reconstruct's redraw.
        original = decode_one(DecodeTask(FileSource(str(path))), full_engine.config.encoder.image_size, None)
        redraw = full_engine.reconstruct([path], steps=CHECK.steps, seed=CHECK.seed, sampler="dpm", batch_size=1)[0]
        assert record["self_check_score"] == fidelity(original.pixels, np.asarray(redraw))
        assert 0.0 <= record["self_check_score"] <= 1.0
        assert record["self_check_low"] == (record["self_check_score"] < CHECK.threshold)


def test_scores_do_not_depend_on_batch_size_or_order(full_engine, images, tmp_path):
    runs = []
    for i, (batch_size, order) in enumerate(((1, images), (5, images[::-1]), (16, images))):
        _run(full_engine, order, tmp_path / f"o{i}.jsonl", batch_size=batch_size)
        runs.append({r["id"]: (r["caption"], r["self_check_score"]) for r in read_jsonl(tmp_path / f"o{i}.jsonl")})
    assert runs[0] == runs[1] == runs[2]


def test_threshold_sets_the_flag(full_engine, images, tmp_path):
    strict = _run(full_engine, images, tmp_path / "all.jsonl", self_check=SelfCheckOptions(steps=2, threshold=1.0))
    lenient = _run(full_engine, images, tmp_path / "none.jsonl", self_check=SelfCheckOptions(steps=2, threshold=0.0))
    high, low = read_jsonl(tmp_path / "all.jsonl"), read_jsonl(tmp_path / "none.jsonl")
    assert strict.flagged == sum(r["self_check_low"] for r in high) and lenient.flagged == 0
    assert [r["self_check_score"] for r in high] == [r["self_check_score"] for r in low]
    assert all(r["self_check_low"] for r in high if r["self_check_score"] < 1.0)
    assert not any(r["self_check_low"] for r in low)
    assert high[0]["gen"] != low[0]["gen"]  # the threshold is part of the settings


def test_self_check_settings_redo_the_job_and_reruns_skip_it(full_engine, images, tmp_path):
    out = tmp_path / "o.jsonl"
    plain = _run(full_engine, images, out, self_check=None)
    checked = _run(full_engine, images, out)
    assert plain.captioned == checked.captioned == len(images)
    assert all("self_check_score" in r for r in read_jsonl(out))
    assert len(list(tmp_path.glob("o.prev-*.jsonl"))) == 1  # the unchecked file moved aside
    again = _run(full_engine, images, out)
    assert (again.already_done, again.captioned) == (len(images), 0)
    more_steps = _run(full_engine, images, out, self_check=SelfCheckOptions(steps=3))
    assert more_steps.captioned == len(images)


def test_reused_results_keep_their_scores(full_engine, images, tmp_path):
    # The same bytes under another name are written from the manifest, score included.
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "a.png").write_bytes(images[0].read_bytes())
    (folder / "b.png").write_bytes(images[0].read_bytes())
    out = tmp_path / "o.jsonl"
    _run(full_engine, [folder / "a.png"], out)
    summary = _run(full_engine, [folder / "a.png", folder / "b.png"], out)
    a, b = read_jsonl(out)
    assert summary.reused == 1 and summary.captioned == 0
    assert a["self_check_score"] == b["self_check_score"] and a["self_check_low"] == b["self_check_low"]


def test_lost_output_is_rebuilt_with_scores(full_engine, images, tmp_path):
    out = tmp_path / "o.jsonl"
    _run(full_engine, images, out)
    before = out.read_bytes()
    (tmp_path / "o.jsonl.manifest.sqlite").unlink()  # the records are then the truth
    summary = _run(full_engine, images, out)
    assert summary.already_done == len(images) and out.read_bytes() == before


def test_parquet_has_typed_self_check_columns(full_engine, images, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "o.parquet"
    _run(full_engine, images, out, format="parquet")
    table = pq.read_table(out)
    assert str(table.schema.field("self_check_score").type) == "double"
    assert str(table.schema.field("self_check_low").type) == "bool"
    rows = table.to_pylist()
    jsonl = tmp_path / "o.jsonl"
    _run(full_engine, images, jsonl)
    assert [(r["id"], r["self_check_score"], r["self_check_low"]) for r in rows] == \
        [(r["id"], r["self_check_score"], r["self_check_low"]) for r in read_jsonl(jsonl)]


def test_an_engine_without_a_diffusion_decoder_is_refused(engine, images, tmp_path):
    with pytest.raises(UsageError, match="diffusion decoder"):
        _run(engine, images, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_self_check_flags(images, tmp_path):
    from vlv_engine.cli import main

    out = tmp_path / "o.jsonl"
    rc = main(["caption", *map(str, images[:3]), "--out", str(out), "--workers", "0", "--quiet", "--self-check",
               "--self-check-steps", "2", "--self-check-threshold", "1", "--max-new-tokens", "4"])
    assert rc == 0
    records = read_jsonl(out)
    assert len(records) == 3 and all(0 <= r["self_check_score"] <= 1 for r in records)
    assert all(r["self_check_low"] == (r["self_check_score"] < 1) for r in records)
    assert main(["caption", str(images[0]), "--out", str(out), "--self-check", "--self-check-threshold",
                 "3"]) == 2


def test_version_1_manifest_gains_the_extra_column(tmp_path):
    path = tmp_path / "m.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE results (sha256 TEXT NOT NULL, model TEXT NOT NULL, gen TEXT NOT NULL,
            status TEXT NOT NULL, caption TEXT, reason TEXT, PRIMARY KEY (sha256, model, gen)) WITHOUT ROWID;
        INSERT INTO results VALUES ('abc', 'm', 'g', 'done', 'a red circle', NULL);
    """)
    db.close()
    with Manifest(path, model="m", gen="g") as manifest:
        result = manifest.results(["abc"])["abc"]
        assert (result.caption, result.extra, result.extra_fields()) == ("a red circle", None, {})


def test_captions_unchanged_by_the_self_check(full_engine, images, tmp_path):
    _run(full_engine, images, tmp_path / "a.jsonl", self_check=None)
    _run(full_engine, images, tmp_path / "b.jsonl")
    assert captions_by_id(tmp_path / "a.jsonl") == captions_by_id(tmp_path / "b.jsonl")
