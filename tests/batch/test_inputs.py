"""Input kinds: folders, globs, @lists, webdataset tar shards, parquet."""

import io
import os
import tarfile

import pytest
from batch_helpers import GEN, captions_by_id, make_images

from vlv_engine.batch import InputSpecError, JobOptions, caption_dataset, collect_items, iter_items
from vlv_engine.batch.inputs import read_bytes, shard_of


def _ids(specs, **kw):
    return [it.item_id for it in iter_items([str(s) for s in specs], **kw)]


def test_folder_is_recursive_and_sorted_and_keeps_explicit_missing_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.JPG", "notes.txt", "b/0.webp"):
        (tmp_path / name).write_bytes(b"")
    assert _ids([tmp_path, tmp_path / "missing.png"]) == [
        str(tmp_path / "1.JPG"), str(tmp_path / "b/0.webp"), str(tmp_path / "b/2.png"), str(tmp_path / "missing.png")]


def test_glob_list_and_duplicates(tmp_path):
    paths = make_images(tmp_path / "d", 4)
    (tmp_path / "d" / "other.gif").write_bytes(b"")
    (tmp_path / "d" / "notes.txt").write_bytes(b"")
    assert _ids([tmp_path / "d" / "*.png"]) == [str(p) for p in paths]
    assert _ids([tmp_path / "**" / "img0001.png"]) == [str(paths[1])]
    every_image = [str(p) for p in paths] + [str(tmp_path / "d" / "other.gif")]
    assert _ids([tmp_path / "**"]) == every_image  # not notes.txt, and no item twice
    assert _ids([tmp_path / "*"]) == every_image  # a matched folder is expanded

    listing = tmp_path / "d" / "list.txt"
    listing.write_text(f"# two images, one twice, relative to the list\nimg0003.png\n\n{paths[0]}\nimg0003.png\n")
    assert _ids(["@" + str(listing), paths[0]]) == [str(paths[3]), str(paths[0])]
    with pytest.raises(InputSpecError, match="cannot read list file"):
        _ids(["@" + str(tmp_path / "absent.txt")])


def _shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tar_shard_items_are_keyed_by_member(tmp_path, engine):
    images = make_images(tmp_path / "src", 3)
    shard = tmp_path / "shard-000.tar"
    _shard(shard, {"a/000.jpg": images[0].read_bytes(), "a/000.json": b"{}", "a/001.png": images[1].read_bytes(),
                   "a/001.webp": images[2].read_bytes(),  # a second image of one sample: ignored
                   "a/002.png": b"broken", "README": b"hello"})
    items = collect_items([str(shard)])
    assert [it.item_id for it in items] == [f"{shard}::a/000", f"{shard}::a/001", f"{shard}::a/002"]
    assert [it.key for it in items] == ["a/000", "a/001", "a/002"]
    assert read_bytes(items[1].source) == images[1].read_bytes()
    out = tmp_path / "o.jsonl"
    summary = caption_dataset(engine, [str(shard)], JobOptions(out=out, generation=GEN, workers=0))
    assert summary.failed == 1
    assert list(captions_by_id(out).values()) == engine.caption(images[:2], **GEN)


def test_a_truncated_tar_shard_fails_only_its_cut_members(tmp_path, engine):
    images = make_images(tmp_path / "src", 4)
    shard = tmp_path / "s.tar"
    _shard(shard, {f"{i}.png": p.read_bytes() for i, p in enumerate(images)})
    with tarfile.open(shard) as tf:
        cut = [m for m in tf][2].offset_data + 100  # inside the third image
    shard.write_bytes(shard.read_bytes()[:cut])
    out = tmp_path / "o.jsonl"
    summary = caption_dataset(engine, [str(shard)], JobOptions(out=out, generation=GEN, workers=0))
    captions = captions_by_id(out)
    assert summary.failed == 1  # the third; the fourth's header is gone
    assert list(captions.values()) == engine.caption(images[:2], **GEN)


def test_shard_assignment_is_stable_and_covers_everything():
    ids = [f"/data/{i}.png" for i in range(200)]
    shards = [shard_of(i, 4) for i in ids]
    assert shards == [shard_of(i, 4) for i in ids] and set(shards) == {0, 1, 2, 3}
    assert shard_of("/data/0.png", 4) == 3  # fixed forever: clusters rely on it across versions


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def test_parquet_input(tmp_path, engine):
    images = make_images(tmp_path / "src", 3)
    path = tmp_path / "t.parquet"
    if not _has_pyarrow():
        path.write_bytes(b"PAR1")
        with pytest.raises(InputSpecError, match="pip install pyarrow"):
            collect_items([str(path)])
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": {"bytes": images[0].read_bytes(), "path": None}, "n": 0},
            {"image": {"bytes": None, "path": os.path.relpath(images[1], tmp_path)}, "n": 1},
            {"image": {"bytes": b"not an image", "path": None}, "n": 2}]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    items = collect_items([str(path)])
    assert [it.item_id for it in items] == [f"{path}::{i}" for i in range(3)]
    out = tmp_path / "o.jsonl"
    summary = caption_dataset(engine, [str(path)], JobOptions(out=out, generation=GEN, workers=2))
    assert summary.failed == 1
    assert list(captions_by_id(out).values()) == engine.caption(images[:2], **GEN)
    with pytest.raises(InputSpecError, match="no image column"):
        collect_items([str(path)], image_column="nope")
