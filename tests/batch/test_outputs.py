"""Output kinds (JSONL, txt sidecars, tar shards, parquet, stdout) and the embedding cache."""

import io
import json
import tarfile

import pytest
from batch_helpers import GEN, captions_by_id, make_images, read_jsonl

from vlv_engine.batch import JobOptions, OutputError, UsageError, caption_dataset


@pytest.fixture()
def images(tmp_path):
    return make_images(tmp_path / "images", 6, seed=5)


@pytest.fixture()
def reference(engine, images):
    return engine.caption(images, **GEN)


def _run(engine, inputs, **kw):
    kw.setdefault("generation", GEN)
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return caption_dataset(engine, [str(i) for i in inputs], JobOptions(**kw))


def test_jsonl_records(engine, images, reference, tmp_path):
    out = tmp_path / "o.jsonl"
    summary = _run(engine, [tmp_path / "images"], out=out)
    records = read_jsonl(out)
    assert [r["caption"] for r in records] == reference
    assert set(records[0]) == {"id", "path", "caption", "sha256", "model", "gen"}
    assert (summary.captioned, summary.exit_status) == (6, 0)


def test_txt_sidecars(engine, images, reference, tmp_path):
    manifest = tmp_path / "state.sqlite"
    _run(engine, [tmp_path / "images"], format="txt", manifest=manifest)
    assert [p.with_suffix(".txt").read_text() for p in images] == reference
    again = _run(engine, [tmp_path / "images"], format="txt", manifest=manifest)
    assert again.already_done == 6 and again.captioned == 0
    with pytest.raises(UsageError, match="--manifest"):
        _run(engine, [tmp_path / "images"], format="txt")


def test_txt_sidecars_refuse_two_images_with_one_sidecar(engine, images, tmp_path):
    images[0].with_suffix(".jpg").write_bytes(images[0].read_bytes())
    with pytest.raises(UsageError, match="would both write"):
        _run(engine, [tmp_path / "images"], format="txt", manifest=tmp_path / "m.sqlite")


def _read_shards(folder):
    samples = {}
    for shard in sorted(folder.glob("captions-*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return samples


def test_tar_shards_keyed_like_the_inputs_and_repaired_after_a_kill(engine, images, reference, tmp_path):
    out = tmp_path / "shards"
    _run(engine, [tmp_path / "images"], format="tar", out=out, tar_max_per_shard=4, batch_size=2)
    shards = sorted(out.glob("captions-*.tar"))
    assert len(shards) == 2
    samples = _read_shards(out)
    keys = [str(p.with_suffix("")).lstrip("/") for p in images]
    assert list(samples) == keys
    assert [samples[k]["txt"].decode() for k in keys] == reference
    assert json.loads(samples[keys[0]]["json"])["id"] == str(images[0])
    # A kill after appending to the open shard and before the commit leaves junk past
    # the committed length (here also a torn header); the rerun cuts it.
    with open(shards[-1], "ab") as fp:
        fp.write(b"\0" * 1024 + b"torn header")
    again = _run(engine, [tmp_path / "images"], format="tar", out=out, tar_max_per_shard=4)
    assert again.already_done == 6
    assert _read_shards(out) == samples


def test_a_finished_tar_shard_that_is_gone_is_reported_not_counted_done(engine, images, tmp_path):
    out = tmp_path / "shards"
    _run(engine, [tmp_path / "images"], format="tar", out=out, tar_max_per_shard=4, batch_size=2)
    first = sorted(out.glob("captions-*.tar"))[0]
    first.unlink()
    with pytest.raises(OutputError, match=f"lacks {first.name}, finished by this manifest"):
        _run(engine, [tmp_path / "images"], format="tar", out=out, tar_max_per_shard=4)


def test_parquet_output(engine, images, reference, tmp_path):
    out = tmp_path / "o.parquet"
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(OutputError, match="pip install pyarrow"):
            _run(engine, [tmp_path / "images"], format="parquet", out=out)
        return
    _run(engine, [tmp_path / "images"], format="parquet", out=out)
    table = pq.read_table(out)
    assert table.column("caption").to_pylist() == reference
    assert table.column("id").to_pylist() == [str(p) for p in images]


def test_stdout_stream(engine, images, reference, tmp_path):
    stream = io.StringIO()
    summary = _run(engine, [tmp_path / "images"], stream=stream)
    assert [json.loads(line)["caption"] for line in stream.getvalue().splitlines()] == reference
    assert summary.paths.manifest is None  # nothing left behind


def test_embedding_cache_decodes_new_settings_without_the_encoder(engine, images, tmp_path, monkeypatch):
    cache = tmp_path / "emb"
    _run(engine, [tmp_path / "images"], out=tmp_path / "a.jsonl", embedding_cache=cache)
    (folder,) = cache.iterdir()
    assert len(list(folder.glob("emb-*.safetensors"))) == 1

    def no_encoder(*args, **kwargs):
        raise AssertionError("the image encoder ran")

    other = {**GEN, "max_new_tokens": 3}
    monkeypatch.setattr(engine, "embed_loaded", no_encoder)
    summary = _run(engine, [tmp_path / "images"], out=tmp_path / "b.jsonl", embedding_cache=cache, generation=other)
    assert summary.captioned == 6
    monkeypatch.undo()
    assert list(captions_by_id(tmp_path / "b.jsonl").values()) == engine.caption(images, **other)
