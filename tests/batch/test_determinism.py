"""Captions do not depend on batch size, workers, shard split, input order or OOM retries."""

import pytest
from batch_helpers import GEN, captions_by_id, make_images

from vlv_engine.batch import JobOptions, caption_dataset
from vlv_engine.batch.oom import AdaptiveBatch, is_out_of_memory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), 13, seed=3)


def _captions(engine, inputs, out, **kw) -> dict[str, str]:
    kw.setdefault("generation", GEN)
    kw.setdefault("workers", 0)
    caption_dataset(engine, [str(i) for i in inputs], JobOptions(out=out, **kw))
    return captions_by_id(out)


@pytest.fixture(scope="module")
def reference(engine, images):
    return dict(zip((str(p) for p in images), engine.caption(images, **GEN)))


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_batch_size(engine, images, reference, tmp_path, batch_size):
    assert _captions(engine, images, tmp_path / "o.jsonl", batch_size=batch_size) == reference


def test_worker_processes(engine, images, reference, tmp_path):
    assert _captions(engine, images, tmp_path / "o.jsonl", workers=2, batch_size=3, max_in_flight=2) == reference


def test_shard_split(engine, images, reference, tmp_path):
    merged: dict[str, str] = {}
    for index in range(3):
        out = tmp_path / "o.jsonl"
        caption_dataset(engine, [str(p) for p in images],
                        JobOptions(out=out, generation=GEN, workers=0, shard_index=index, num_shards=3))
        part = captions_by_id(tmp_path / f"o.{index:05d}-of-00003.jsonl")
        assert not set(part) & set(merged)  # every item in exactly one shard
        merged.update(part)
    assert merged == reference


def test_input_order(engine, images, reference, tmp_path):
    out = tmp_path / "o.jsonl"
    assert _captions(engine, images[::-1], out, batch_size=4) == reference
    assert list(captions_by_id(out)) == [str(p) for p in images[::-1]]  # written in input order


def test_fake_oom_splits_the_batch_and_gives_the_same_captions(engine, images, reference, tmp_path, monkeypatch):
    sizes = {"encode": [], "decode": []}
    embed, decode = engine.embed_loaded, engine.caption_embeddings

    def embed_or_oom(imgs, batch_size=None):
        sizes["encode"].append(len(imgs))
        if len(imgs) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return embed(imgs, batch_size)

    def decode_or_oom(embeddings, batch_size=None, **gen):
        sizes["decode"].append(embeddings.shape[0])
        if embeddings.shape[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return decode(embeddings, batch_size=batch_size, **gen)

    monkeypatch.setattr(engine, "embed_loaded", embed_or_oom)
    monkeypatch.setattr(engine, "caption_embeddings", decode_or_oom)
    assert _captions(engine, images, tmp_path / "o.jsonl", batch_size=8) == reference
    # 8 failed, halved to 4, failed, halved to 2, which worked and stayed.
    assert sizes["encode"][:3] == [8, 4, 2] and max(sizes["encode"][3:]) == 2
    assert sizes["decode"][:3] == [8, 4, 2] and max(sizes["decode"][3:]) == 2


def test_adaptive_batch_raises_what_is_not_oom_and_oom_on_one_item():
    batch = AdaptiveBatch(4)
    with pytest.raises(ValueError):
        batch.run(lambda chunk: (_ for _ in ()).throw(ValueError("bug")), [1, 2, 3])
    with pytest.raises(RuntimeError, match="out of memory"):
        batch.run(lambda chunk: (_ for _ in ()).throw(RuntimeError("out of memory")), [1, 2, 3])
    assert batch.size == 1
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))
