"""Exactly once: reruns, kills at random points, torn tails, lost files, changed settings."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from batch_helpers import GEN, captions_by_id, make_images, read_jsonl
from PIL import Image

from vlv_engine import Engine
from vlv_engine.batch import JobOptions, ManifestError, caption_dataset
from vlv_engine.batch.manifest import Manifest


def _run(engine, inputs, out, **kw):
    kw.setdefault("generation", GEN)
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return caption_dataset(engine, [str(i) for i in inputs], JobOptions(out=out, **kw))


# ---------------------------------------------------------------- kills


def _cli(folder, out, *extra):
    # Its own session, so the kill takes the decode workers too, like a lost node.
    cmd = [sys.executable, "-m", "vlv_engine.cli", "caption", str(folder), "--out", str(out), "--batch-size", "4",
           "--workers", "1", "--quiet",
           "--flush-seconds", "0", *extra]  # a commit after every batch: more places for a kill to land
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest._one_torch_thread
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)


def _lines(path) -> int:
    try:
        with open(path, "rb") as fp:
            return fp.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_and_resume(tmp_path, n_images: int, kills: int, seed: int) -> None:
    folder = tmp_path / "images"
    make_images(folder, n_images, seed=seed)
    out = tmp_path / "out.jsonl"
    rng = random.Random(seed)
    killed_at = []
    for _ in range(kills):
        target = _lines(out) + rng.randint(1, max(2, n_images // (kills + 2)))
        proc = _cli(folder, out)
        deadline = time.monotonic() + 120
        while _lines(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.0, 0.01))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at.append(_lines(out))
    assert killed_at[-1] < n_images, f"the runs finished before the kills ({killed_at}); make the test bigger"
    final = _cli(folder, out)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()

    # Reference: one uninterrupted run of the same model, in this process.
    reference = tmp_path / "reference.jsonl"
    summary = caption_dataset(Engine.from_pretrained(load_diffusion=False), [str(folder)],
                              JobOptions(out=reference, workers=0, batch_size=16))
    assert summary.captioned == n_images
    assert out.read_bytes() == reference.read_bytes()  # same records, same order, no duplicates
    assert len(captions_by_id(out)) == n_images


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path):
    _kill_and_resume(tmp_path, n_images=200, kills=3, seed=1)


@pytest.mark.slow
def test_sigkill_many_times_over_thousands_of_images(tmp_path):
    _kill_and_resume(tmp_path, n_images=2000, kills=5, seed=2)


# ---------------------------------------------------------------- torn tails, lost files


@pytest.fixture()
def finished(tmp_path, engine):
    """A finished run over 10 images: (folder, out, reference bytes)."""
    folder = tmp_path / "images"
    make_images(folder, 10)
    out = tmp_path / "out.jsonl"
    _run(engine, [folder], out)
    return folder, out, out.read_bytes()


def test_rerun_is_a_no_op(finished, engine):
    folder, out, ref = finished
    summary = _run(engine, [folder], out)
    assert (summary.already_done, summary.captioned, summary.reused) == (10, 0, 0)
    assert out.read_bytes() == ref


def test_a_torn_last_line_is_cut_and_the_item_redone(finished, engine):
    folder, out, ref = finished
    lines = ref.splitlines(keepends=True)
    # A kill in the middle of the last batch's write: the committed state says 10
    # records, the file holds 9 and a half.  Rewind the manifest by dropping it.
    out.write_bytes(b"".join(lines[:9]) + lines[9][:17])
    os.remove(f"{out}.manifest.sqlite")
    summary = _run(engine, [folder], out)
    assert summary.captioned == 1  # nine records were read back, one redone
    assert out.read_bytes() == ref


def test_uncommitted_records_past_the_manifest_are_cut(finished, engine):
    folder, out, ref = finished
    # A kill after the output fsync and before the manifest commit: complete lines the
    # manifest does not know, plus a torn one.
    out.write_bytes(ref + ref.splitlines(keepends=True)[3] + b'{"id": "x", "cap')
    summary = _run(engine, [folder], out)
    assert summary.captioned == 0
    assert out.read_bytes() == ref


def test_a_deleted_output_is_rewritten_from_the_manifest_without_the_model(finished, engine, monkeypatch):
    folder, out, ref = finished
    out.unlink()
    monkeypatch.setattr(engine, "embed_loaded", _must_not_run)
    summary = _run(engine, [folder], out)
    assert (summary.captioned, summary.reused) == (0, 10)
    assert out.read_bytes() == ref


def test_a_deleted_manifest_is_rebuilt_from_the_output(finished, engine, monkeypatch):
    folder, out, ref = finished
    os.remove(f"{out}.manifest.sqlite")
    monkeypatch.setattr(engine, "embed_loaded", _must_not_run)
    summary = _run(engine, [folder], out)
    assert summary.captioned == 0
    assert out.read_bytes() == ref


def test_a_file_that_is_not_ours_is_renamed_aside_not_edited(tmp_path, engine):
    folder = tmp_path / "images"
    make_images(folder, 3)
    out = tmp_path / "out.jsonl"
    old = b'{"path": "a.png", "caption": "from the old vlv caption"}\n{"path": "b.png", "capt'
    out.write_bytes(old)
    summary = _run(engine, [folder], out)
    assert summary.captioned == 3 and len(read_jsonl(out)) == 3
    assert (tmp_path / "out.prev.jsonl").read_bytes() == old


def _must_not_run(*args, **kwargs):
    raise AssertionError("the image encoder ran")


def test_a_changed_image_replaces_its_record(finished, engine):
    folder, out, ref = finished
    changed = sorted(folder.iterdir())[4]
    Image.new("RGB", (9, 9), (250, 0, 0)).save(changed)
    summary = _run(engine, [folder], out)
    assert summary.captioned == 1 and summary.already_done == 9
    records = read_jsonl(out)
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    (new,) = [r for r in records if r["id"] == str(changed)]
    assert new["caption"] == engine.caption([changed], **GEN)[0]


def test_other_generation_settings_recaption_and_the_old_file_is_kept_aside(finished, engine):
    folder, out, ref = finished
    summary = _run(engine, [folder], out, generation={**GEN, "max_new_tokens": 3})
    assert summary.captioned == 10
    aside = [p for p in out.parent.iterdir() if p.name.startswith("out.prev-")]
    assert len(aside) == 1 and aside[0].read_bytes() == ref
    records = read_jsonl(out)
    assert [r["caption"] for r in records] == engine.caption(sorted(folder.iterdir()), **{**GEN, "max_new_tokens": 3})
    # Going back to the first settings reuses their results: no model call.
    back = _run(engine, [folder], out)
    assert (back.captioned, back.reused) == (0, 10)
    assert out.read_bytes() == ref


def test_retry_failed(tmp_path, engine):
    folder = tmp_path / "images"
    make_images(folder, 4)
    Image.new("RGB", (40, 30)).save(folder / "big.png")
    out = tmp_path / "out.jsonl"
    first = _run(engine, [folder], out, max_pixels=1000)
    assert first.failed == 1 and first.exit_status == 1
    assert [r["path"] for r in read_jsonl(first.paths.errors)] == [str(folder / "big.png")]
    # A failure is remembered: a plain rerun does not try it again.
    again = _run(engine, [folder], out, max_pixels=10_000)
    assert again.failed == 1 and again.captioned == 0
    retried = _run(engine, [folder], out, max_pixels=10_000, retry_failed=True)
    assert (retried.failed, retried.captioned, retried.exit_status) == (0, 1, 0)
    assert read_jsonl(retried.paths.errors) == []
    assert len(captions_by_id(out)) == 5


def test_one_run_per_manifest(tmp_path):
    path = tmp_path / "m.sqlite"
    with Manifest(path, model="m", gen="g"):
        with pytest.raises(ManifestError, match="in use by another run"):
            Manifest(path, model="m", gen="g")


def test_cli_exit_status_and_usage_errors(tmp_path):
    from vlv_engine.cli import main

    make_images(tmp_path / "images", 2)
    assert main(["caption", str(tmp_path / "images"), "--out", str(tmp_path / "o.jsonl"), "--quiet"]) == 0
    assert main(["caption", str(tmp_path / "nothing*.png"), "--quiet"]) == 2  # matches nothing
    assert main(["caption", "@" + str(tmp_path / "absent.txt"), "--quiet"]) == 2
    assert main(["caption", str(tmp_path / "images"), "--format", "txt", "--quiet"]) == 2  # no --manifest
    assert main(["caption", str(tmp_path / "images"), "--out", str(tmp_path / "o.jsonl"), "--shard-index", "3",
                 "--num-shards", "2", "--quiet"]) == 2
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["caption"]


def test_an_error_mid_run_keeps_the_finished_batches(tmp_path, engine, monkeypatch):
    folder = tmp_path / "images"
    make_images(folder, 10)
    out = tmp_path / "out.jsonl"
    decode, calls = engine.caption_embeddings, []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("a bug in the third batch")
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine, "caption_embeddings", fail_third)
    with pytest.raises(ValueError, match="third batch"):
        _run(engine, [folder], out, flush_seconds=3600)  # only the final flush writes
    assert len(read_jsonl(out)) == 8
    monkeypatch.undo()
    summary = _run(engine, [folder], out)
    assert (summary.already_done, summary.captioned) == (8, 2)
    assert list(captions_by_id(out).values()) == engine.caption(sorted(folder.iterdir()), **GEN)
