"""Where a job's files go and what it reads: files that are not the job's are kept,
paths that would share a file are refused, inputs that are no image files cost only
themselves, and an image that turns bad loses its old caption everywhere it can."""

import os
import threading

import pytest
from batch_helpers import GEN, captions_by_id, make_images, read_jsonl

from vlv_engine.batch import JobOptions, UsageError, caption_dataset
from vlv_engine.batch.options import JobPaths


def _run(engine, inputs, **kw):
    kw.setdefault("generation", GEN)
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return caption_dataset(engine, [str(i) for i in inputs], JobOptions(**kw))


@pytest.mark.parametrize("foreign", [b'{"id": "x", "caption": "precious"}', b"one\rtwo\nthree\n"],
                         ids=["one-line-without-newline", "lone-carriage-return"])
def test_a_file_at_out_that_is_not_ours_is_renamed_aside_whole(engine, tmp_path, foreign):
    images = make_images(tmp_path / "images", 2, seed=1)
    out = tmp_path / "o.jsonl"
    out.write_bytes(foreign)
    _run(engine, images, out=out)
    asides = sorted(tmp_path.glob("o.prev*.jsonl"))
    assert [p.read_bytes() for p in asides] == [foreign]
    assert len(read_jsonl(out)) == 2


def test_a_torn_tail_after_our_records_is_still_cut(engine, tmp_path):
    images = make_images(tmp_path / "images", 3, seed=2)
    out = tmp_path / "o.jsonl"
    _run(engine, images, out=out)
    whole = out.read_bytes()
    (tmp_path / "o.jsonl.manifest.sqlite").unlink()  # the manifest is rebuilt from the file
    out.write_bytes(whole + b'{"id": "half')
    _run(engine, images, out=out)
    assert out.read_bytes() == whole and not list(tmp_path.glob("o.prev*"))


@pytest.mark.parametrize("kw", [
    {"errors": "o.jsonl"}, {"manifest": "o.jsonl"}, {"errors": "m.sqlite", "manifest": "m.sqlite"},
], ids=["out-is-errors", "out-is-manifest", "errors-is-manifest"])
def test_paths_that_share_a_file_are_refused(tmp_path, kw):
    options = JobOptions(out=tmp_path / "o.jsonl", **{k: tmp_path / v for k, v in kw.items()})
    with pytest.raises(UsageError, match="name the same file"):
        JobPaths.resolve(options)


def test_a_link_to_the_same_file_is_the_same_file(tmp_path):
    (tmp_path / "o.jsonl").touch()
    os.symlink(tmp_path / "o.jsonl", tmp_path / "link.jsonl")
    with pytest.raises(UsageError, match="--out and --errors"):
        JobPaths.resolve(JobOptions(out=tmp_path / "o.jsonl", errors=tmp_path / "link.jsonl"))


def test_an_output_of_the_wrong_kind_is_a_usage_error(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").touch()
    with pytest.raises(UsageError, match="is a folder"):
        JobPaths.resolve(JobOptions(out=tmp_path / "folder"))
    with pytest.raises(UsageError, match="tar output is a folder"):
        JobPaths.resolve(JobOptions(out=tmp_path / "file", format="tar"))


@pytest.mark.parametrize("fmt", ["jsonl", "tar", "txt"])
def test_shards_never_share_a_given_manifest_or_errors_file(tmp_path, fmt):
    paths = [JobPaths.resolve(JobOptions(out=tmp_path / ("o" if fmt == "tar" else "o.jsonl"), format=fmt,
                                         manifest=tmp_path / "m.sqlite", errors=tmp_path / "e.jsonl",
                                         num_shards=2, shard_index=i)) for i in range(2)]
    assert paths[0].manifest != paths[1].manifest and paths[0].errors != paths[1].errors
    assert paths[0].manifest.name == "m.00000-of-00002.sqlite"


def test_parquet_output_holds_a_file_name_that_is_not_utf8(engine, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    images = make_images(tmp_path / "images", 2, seed=3)
    bad = os.fsdecode(os.fsencode(str(images[1].parent)) + b"/bad\xff.png")
    os.rename(images[1], bad)
    out = tmp_path / "o.parquet"
    summary = _run(engine, [tmp_path / "images"], out=out)
    rows = pq.read_table(out).to_pylist()
    assert summary.captioned == 2 and len(rows) == 2
    assert any(r["path"].endswith("bad\\udcff.png") for r in rows)


def test_two_images_under_one_tar_key_are_refused(engine, tmp_path):
    make_images(tmp_path / "images", 1, seed=4)
    make_images(tmp_path / "images", 1, seed=5, suffix=".jpg")  # img0000.png and img0000.jpg
    with pytest.raises(UsageError, match="would both be tar sample"):
        _run(engine, [tmp_path / "images"], out=tmp_path / "o", format="tar")


def test_an_image_that_turns_bad_loses_its_old_sidecar(engine, tmp_path):
    images = make_images(tmp_path / "images", 3, seed=6)
    manifest = tmp_path / "state" / "m.sqlite"
    _run(engine, [tmp_path / "images"], format="txt", manifest=manifest)
    sidecar = images[1].with_suffix(".txt")
    assert sidecar.exists()
    images[1].write_bytes(b"garbage now")
    summary = _run(engine, [tmp_path / "images"], format="txt", manifest=manifest)
    assert summary.failed == 1 and not sidecar.exists()
    assert images[0].with_suffix(".txt").exists() and images[2].with_suffix(".txt").exists()
    errors = read_jsonl(tmp_path / "state" / "m.errors.jsonl")
    assert [e["path"] for e in errors] == [str(images[1])]


def test_a_fifo_among_the_inputs_fails_alone_without_blocking_the_run(engine, tmp_path):
    images = make_images(tmp_path / "images", 2, seed=7)
    fifo = tmp_path / "images" / "img0001b.png"
    os.mkfifo(fifo)
    out = tmp_path / "o.jsonl"
    done = threading.Event()
    result = {}

    def job():
        result["summary"] = _run(engine, [*images[:1], fifo, *images[1:]], out=out)
        done.set()

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    if not done.wait(120):  # a blocking open would wait for a writer forever: unblock it
        with open(fifo, "wb"):
            pass
        thread.join(30)
        pytest.fail("the run blocked on the FIFO")
    assert result["summary"].failed == 1
    assert set(captions_by_id(out)) == {os.path.abspath(p) for p in images}
    errors = read_jsonl(tmp_path / "o.errors.jsonl")
    assert errors[0]["path"] == str(fifo) and "not a regular file (a FIFO)" in errors[0]["reason"]


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(engine, tmp_path, monkeypatch):
    import vlv_engine.batch.inputs as inputs

    images = make_images(tmp_path / "images", 2, seed=8)
    monkeypatch.setattr(inputs, "MAX_FILE_BYTES", min(p.stat().st_size for p in images) - 1)
    out = tmp_path / "o.jsonl"
    summary = _run(engine, images, out=out)
    assert summary.failed == 2
    assert all("limit for one image file" in e["reason"] for e in read_jsonl(tmp_path / "o.errors.jsonl"))


@pytest.mark.parametrize("cell", ["text", "hf-image"])
def test_an_image_behind_a_parquet_path_cell_is_rechecked(engine, tmp_path, cell):
    """The parquet file is unchanged, the images its cells name are not: a replaced one is
    captioned again from its new bytes, a deleted one fails."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = make_images(tmp_path / "imgs", 3, seed=9)
    names = [os.path.relpath(p, tmp_path) for p in images]
    column = names if cell == "text" else [{"bytes": None, "path": n} for n in names]
    table = tmp_path / "ds.parquet"
    pq.write_table(pa.table({"image": column}), table)
    out = tmp_path / "o.jsonl"
    _run(engine, [table], out=out)
    new = make_images(tmp_path / "other", 1, seed=99)[0]
    os.replace(new, images[0])  # other bytes under the same name
    images[1].unlink()
    summary = _run(engine, [table], out=out)
    assert (summary.captioned, summary.failed, summary.already_done) == (1, 1, 1)
    got = captions_by_id(out)
    assert got[f"{table}::0"] == engine.caption([images[0]], **GEN)[0]
    assert f"{table}::1" not in got and f"{table}::2" in got


def test_listing_an_image_struct_column_reads_its_paths_not_its_bytes(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from vlv_engine.batch import collect_items

    images = make_images(tmp_path / "imgs", 2, seed=10)
    table = tmp_path / "ds.parquet"
    pq.write_table(pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images]}), table)
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, columns=None, **kw: read.append(columns) or real(self, i, columns=columns, **kw))
    assert len(collect_items([str(table)])) == 2
    assert read == [["image.path"]]
