"""The training data layer (training/data.py, installed as vlv_training.data): sources,
skip-and-log decoding, collate (labels keep EOS), deterministic sharding and resume."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlv_engine import shapes
from vlv_engine.images import preprocess
from vlv_engine.tokenization import word_level_tokenizer

try:
    from vlv_training import data as D
except ImportError:  # an install made before training/ was mapped to vlv_training
    _spec = importlib.util.spec_from_file_location(
        "vlv_training_data", Path(__file__).resolve().parents[2] / "training" / "data.py")
    D = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = D  # before exec: pickling and dataclasses look the module up
    _spec.loader.exec_module(D)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def png_bytes(color, size=(10, 8), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def pixels(record) -> np.ndarray:
    return np.asarray(record["image"])


# --- Shapes World ---------------------------------------------------------------


def test_shapes_world_is_a_function_of_seed_and_index():
    src = D.ShapesWorldSource(20, seed=3, jitter=2)
    a, b = src[7], src[7]
    assert a["key"] == "shapes/3/7"
    assert isinstance(a["image"], Image.Image) and a["image"].mode == "RGB" and a["image"].size == (64, 64)
    np.testing.assert_array_equal(pixels(a), pixels(b))
    assert a["caption"] == b["caption"]
    assert shapes.scene_from_caption(a["caption"]) is not None

    # The documented recipe, spelled out.
    rng = np.random.default_rng([3, 7])
    scene = shapes.sample_scene(rng)
    np.testing.assert_array_equal(pixels(a), shapes.render(scene, jitter=2, rng=rng))
    assert a["caption"] == shapes.caption(scene) and src.scene(7) == scene

    # num_samples only bounds the index; a subset is a slice of the same items.
    big = D.ShapesWorldSource(1000, seed=3, jitter=2)
    for i in (0, 7, 19):
        np.testing.assert_array_equal(pixels(src[i]), pixels(big[i]))
    subset = torch.utils.data.Subset(big, [19, 4])
    assert [r["key"] for r in subset] == ["shapes/3/19", "shapes/3/4"]
    np.testing.assert_array_equal(pixels(subset[1]), pixels(src[4]))

    other = D.ShapesWorldSource(20, seed=4, jitter=2)
    assert other[7]["key"] == "shapes/4/7"
    assert any(not np.array_equal(pixels(src[i]), pixels(other[i])) for i in range(5))
    assert [r["caption"] for r in src][:5] != [r["caption"] for r in other][:5]
    with pytest.raises(IndexError):
        src[20]


# --- image folders ----------------------------------------------------------------


def make_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (root / "b.JPG").write_bytes(png_bytes((0, 255, 0), fmt="JPEG"))
    (root / "sub" / "c.webp").write_bytes(png_bytes((0, 0, 255), fmt="WEBP"))
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"macOS resource fork")


def test_image_folder_with_jsonl_captions(tmp_path, caplog):
    root = tmp_path / "imgs"
    make_folder(root)
    lines = [{"path": "a.png", "caption": "red "}, {"file": str(root / "b.JPG"), "text": "green"},
             {"key": "sub/c", "caption": "blue"}, {"path": "gone.png", "caption": "no such image"}]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    with caplog.at_level(logging.WARNING, logger="vlv.training.data"):
        src = D.ImageFolderSource(root, captions)
    assert "name no image" in caplog.text  # the entry for gone.png
    assert src.files == ["a.png", "b.JPG", "sub/c.webp"]
    records = list(src)
    assert [r["key"] for r in records] == ["a.png", "b.JPG", "sub/c.webp"]
    assert [r["caption"] for r in records] == ["red", "green", "blue"]
    assert tuple(pixels(records[0])[0, 0]) == (255, 0, 0)
    assert src.num_skipped == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        D.ImageFolderSource(root, bad)


def test_image_folder_with_txt_sidecars(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    (root / "a.txt").write_text("a red square\n")
    (root / "sub" / "c.txt").write_text("blue")
    src = D.ImageFolderSource(root)
    assert [(r["key"], r["caption"]) for r in src] == [("a.png", "a red square"), ("b.JPG", None),
                                                        ("sub/c.webp", "blue")]


def test_parquet_captions_need_pyarrow(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root)
    path = tmp_path / "captions.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            D.ImageFolderSource(root, path)
        return
    pq.write_table(pa.table({"path": ["a.png"], "caption": ["red"]}), path)
    assert D.ImageFolderSource(root, path)[0]["caption"] == "red"


def test_broken_files_are_skipped_with_reasons(tmp_path, caplog):
    root = tmp_path / "imgs"
    make_folder(root)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.png").write_bytes(png_bytes((9, 9, 9), size=(64, 64))[:60])
    src = D.ImageFolderSource(root)
    with caplog.at_level(logging.WARNING, logger="vlv.training.data"):
        records = list(src)
    assert [r["key"] for r in records] == ["a.png", "b.JPG", "sub/c.webp"]
    reasons = dict(src.skipped)
    assert set(reasons) == {"corrupt.png", "empty.jpg", "truncated.png"} and src.num_skipped == 3
    assert "empty" in reasons["empty.jpg"]
    logged = [r for r in caplog.records if r.name == "vlv.training.data" and r.levelno == logging.WARNING]
    assert len(logged) == 3 and "empty.jpg" in caplog.text and reasons["corrupt.png"] in caplog.text
    with pytest.raises(D.SampleSkipped, match="empty.jpg"):
        src[src.files.index("empty.jpg")]

    # Oversized images are refused from their header.
    small = D.ImageFolderSource(root, max_pixels=50)
    assert "pixel limit" in small.fetch(0).reason


# --- webdataset ------------------------------------------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(tmp_path: Path) -> list[Path]:
    shard0, shard1 = tmp_path / "data-000.tar", tmp_path / "data-001.tar"
    with tarfile.open(shard0, "w") as tar:
        add_member(tar, "s0/000001.jpg", png_bytes((200, 10, 10), fmt="JPEG"))
        add_member(tar, "s0/000001.txt", b"a red image\n")
        add_member(tar, "s0/000002.png", png_bytes((10, 200, 10)))
        add_member(tar, "s0/000002.json", json.dumps({"caption": "green", "width": 10}).encode())
        add_member(tar, "s0/000003.txt", b"caption without an image")
    with tarfile.open(shard1, "w") as tar:
        add_member(tar, "000004.webp", png_bytes((10, 10, 200), fmt="WEBP"))
        add_member(tar, "000004.json", json.dumps({"text": "blue"}).encode())
        add_member(tar, "000005.jpg", b"not a jpeg")
        add_member(tar, "000006.png", png_bytes((1, 2, 3)))
    return [shard0, shard1]


def test_webdataset_round_trip(tmp_path, caplog):
    shards = write_shards(tmp_path)
    assert D.expand_shards(str(tmp_path / "data-{000..001}.tar")) == [str(s) for s in shards]
    assert D.expand_shards("x-{8..10}-{a,b}") == ["x-8-a", "x-8-b", "x-9-a", "x-9-b", "x-10-a", "x-10-b"]

    src = D.WebDatasetSource(str(tmp_path / "data-{000..001}.tar"))
    with caplog.at_level(logging.WARNING, logger="vlv.training.data"):
        records = list(src)
    assert [(r["key"], r["caption"]) for r in records] == [
        ("s0/000001", "a red image"), ("s0/000002", "green"), ("000004", "blue"), ("000006", None)]
    assert pixels(records[1])[0, 0].tolist() == [10, 200, 10]
    assert all(r["image"].mode == "RGB" for r in records)
    assert [k for k, _ in src.skipped] == ["s0/000003", "000005"]
    assert "no image member" in src.skipped[0].reason and "000005" in caplog.text

    # Ranks split by shard file.
    rank1 = D.WebDatasetSource([str(s) for s in shards], rank=1, world_size=2)
    assert [r["key"] for r in rank1] == ["000004", "000006"]
    with pytest.raises(ValueError, match="every rank"):
        D.WebDatasetSource(shards[0], rank=0, world_size=2)


def test_webdataset_truncated_shard_is_skipped(tmp_path):
    shards = write_shards(tmp_path)
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:1200])  # cut inside the second member's data
    src = D.WebDatasetSource([str(s) for s in shards])
    keys = [r["key"] for r in src]
    assert keys[-2:] == ["000004", "000006"]
    assert any(k == str(shards[0]) and "unreadable tar shard" in why for k, why in src.skipped)


def test_webdataset_loader_splits_shards_across_workers(tmp_path):
    shards = write_shards(tmp_path)
    src = D.WebDatasetSource([str(s) for s in shards])
    loader = D.make_loader(src, None, D.make_collate(16, MEAN, STD), batch_size=2, num_workers=2)
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(["s0/000001", "s0/000002", "000004", "000006"])
    assert sorted(k for k, _ in loader.skipped) == ["000005", "s0/000003"]
    with pytest.raises(ValueError, match="sampler=None"):
        D.make_loader(src, D.ShardedSampler(4, seed=0), D.make_collate(16, MEAN, STD), batch_size=2)


# --- sampler ---------------------------------------------------------------------


def test_sampler_ranks_partition_an_epoch():
    n, ws = 103, 4
    samplers = [D.ShardedSampler(n, seed=5, rank=r, world_size=ws) for r in range(ws)]
    parts = [list(s) for s in samplers]
    assert all(len(p) == n // ws == len(s) for p, s in zip(parts, samplers))
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat)
    perm = np.random.default_rng([5, 0]).permutation(n)
    assert set(flat) == set(perm[: ws * (n // ws)].tolist())
    assert parts[1] == perm[1::ws][: n // ws].tolist()

    # Epochs differ; the same epoch repeats.
    s = samplers[0]
    s.set_epoch(1)
    assert list(s) != parts[0] and list(s) == list(s)
    # drop_last=False pads so every rank has the same count.
    padded = [list(D.ShardedSampler(10, seed=0, rank=r, world_size=4, drop_last=False)) for r in range(4)]
    assert [len(p) for p in padded] == [3, 3, 3, 3] and set(sum(padded, [])) == set(range(10))
    assert list(D.ShardedSampler(5, seed=0, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_resume_continues_exactly():
    def run(sampler, batches):
        it = iter(sampler)
        return [[next(it) for _ in range(4)] for _ in range(batches)]

    full = D.ShardedSampler(50, seed=1, rank=1, world_size=2)
    full.set_epoch(2)
    expected = run(full, 6)  # 24 of the rank's 25 indices

    first = D.ShardedSampler(50, seed=1, rank=1, world_size=2)
    first.set_epoch(2)
    head = run(first, 2)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert (state["epoch"], state["position"]) == (2, 8)

    resumed = D.ShardedSampler(50, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a training loop does at the top of the epoch: keeps the position
    assert head + run(resumed, 4) == expected
    resumed.set_epoch(3)
    assert resumed.position == 0 and list(resumed) == resumed.indices(3)

    with pytest.raises(ValueError, match="world_size"):
        D.ShardedSampler(50, seed=1, world_size=4).load_state_dict(state)
    # A state saved after an epoch's last index resumes at the start of the next epoch.
    done = D.ShardedSampler(50, seed=1)
    done.load_state_dict({"epoch": 0, "position": 50})
    assert (done.epoch, list(done)) == (1, done.indices(1))


# --- collate ---------------------------------------------------------------------

WORDS = "a red blue square circle".split()


def records(*captions):
    rng = np.random.default_rng(0)
    return [{"key": f"k{i}", "image": Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)),
             "caption": c} for i, c in enumerate(captions)]


def test_collate_with_a_tokenizer_that_adds_eos():
    tok = word_level_tokenizer(WORDS, add_bos=False, add_eos=True)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert tok("a red square")["input_ids"][-1] == eos
    recs = records("a red square", "a circle", None)
    collate = D.make_collate(16, MEAN, STD, tokenizer=tok, vae_size=8)
    batch = collate(recs + [D.Skipped("gone", "corrupt")])
    assert batch["keys"] == ["k0", "k1"]
    assert [k for k, _ in batch["skipped"]] == ["k2", "gone"]  # k2: no caption; in input order
    torch.testing.assert_close(batch["pixel_values"], preprocess([r["image"] for r in recs[:2]], 16, MEAN, STD),
                               rtol=0, atol=0)
    assert batch["vae_pixel_values"].shape == (2, 3, 8, 8) and batch["vae_pixel_values"].abs().max() <= 1
    ids = tok.convert_tokens_to_ids
    assert batch["input_ids"].tolist() == [[ids("a"), ids("red"), ids("square"), eos],
                                           [ids("a"), ids("circle"), eos, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[ids("a"), ids("red"), ids("square"), eos],
                                        [ids("a"), ids("circle"), eos, -100]]

    # Truncation cuts without an EOS (the caption did not end there).
    short = D.make_collate(16, MEAN, STD, tokenizer=tok, max_caption_tokens=2)(recs[:1])
    assert short["labels"].tolist() == [[ids("a"), ids("red")]]


def test_collate_when_pad_is_eos_and_the_tokenizer_adds_none():
    tok = word_level_tokenizer(WORDS, add_bos=False, add_eos=False)
    tok.pad_token = tok.eos_token  # Qwen base models
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos and tok("a red")["input_ids"][-1] != eos
    batch = D.make_collate(16, MEAN, STD, tokenizer=tok)(records("a red blue square", "a circle"))
    ids = tok.convert_tokens_to_ids
    assert batch["input_ids"].tolist() == [[ids("a"), ids("red"), ids("blue"), ids("square"), eos],
                                           [ids("a"), ids("circle"), eos, eos, eos]]
    assert batch["labels"].tolist() == [[ids("a"), ids("red"), ids("blue"), ids("square"), eos],
                                        [ids("a"), ids("circle"), eos, -100, -100]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 3]


def test_collate_without_tokenizer_decodes_raw_images():
    batch = D.make_collate((8, 12), MEAN, STD)(
        [{"key": "arr", "image": np.zeros((5, 6, 3), np.uint8), "caption": None},
         {"key": "bad", "image": np.zeros((5, 6, 7), np.uint8), "caption": None}])
    assert batch["keys"] == ["arr"] and batch["pixel_values"].shape == (1, 3, 8, 12)
    assert "input_ids" not in batch and [k for k, _ in batch["skipped"]] == ["bad"]


# --- loader ----------------------------------------------------------------------


def test_loader_skips_bad_items_and_yields_every_good_key_once(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(7):
        (root / f"{i}.png").write_bytes(png_bytes((i * 30, 0, 0)))
    (root / "3.png").write_bytes(b"broken")
    src = D.ImageFolderSource(root)
    sampler = D.ShardedSampler(len(src), seed=0)
    for batch_size in (3, 1):  # with 1, the bad item's whole batch fails and is passed over
        loader = D.make_loader(src, sampler, D.make_collate(8, MEAN, STD), batch_size=batch_size)
        batches = list(loader)
        keys = [k for b in batches for k in b["keys"]]
        assert sorted(keys) == [f"{i}.png" for i in range(7) if i != 3]
        assert all(b["pixel_values"].shape[0] == len(b["keys"]) > 0 for b in batches)
        assert loader.skipped == [("3.png", loader.skipped[0].reason)] and "recognised" in loader.skipped[0].reason
        assert sampler.position == 7


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_matches_an_uninterrupted_run(num_workers):
    def make(state=None):
        src = D.ShapesWorldSource(30, seed=2)
        sampler = D.ShardedSampler(len(src), seed=9, rank=0, world_size=2)
        if state is not None:
            sampler.load_state_dict(state)
        return sampler, D.make_loader(src, sampler, D.make_collate(16, MEAN, STD), batch_size=4,
                                      num_workers=num_workers)

    sampler, loader = make()
    full = [b["keys"] for b in loader]
    assert len(full) == 4 and sum(map(len, full)) == 15

    sampler, loader = make()
    it = iter(loader)
    head = [next(it)["keys"] for _ in range(2)]
    state = sampler.state_dict()
    assert state["position"] == 8  # consumed, not what the workers prefetched
    del it
    sampler2, loader2 = make(state)
    tail = [b["keys"] for b in loader2]
    assert head + tail == full
    np.testing.assert_array_equal(  # the same pixels, not only the same keys
        next(iter(make(state)[1]))["pixel_values"].numpy(),
        D.make_collate(16, MEAN, STD)([D.ShapesWorldSource(30, seed=2)[int(k.rsplit("/", 1)[1])]
                                       for k in tail[0]])["pixel_values"].numpy())
