"""The batch job on a local Ray cluster: the local run's outputs, manifest and resume.

One cluster (2 CPUs) serves the whole module: starting Ray takes seconds, and each
job's engine actors take a few more (they import torch and the model).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from batch_helpers import GEN, make_images, read_jsonl

from vlv_engine import Engine
from vlv_engine.batch import JobOptions, UsageError, caption_dataset
from vlv_engine.batch.selfcheck import SelfCheckOptions


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_images")
    make_images(folder, 14, seed=21)
    (folder / "zz_not_an_image.png").write_bytes(b"hostile: not an image at all")
    (folder / "img0003_copy.png").write_bytes((folder / "img0003.png").read_bytes())  # same bytes, other path
    return folder


def _run(engine, folder, out, on_failure=None, **kw):
    kw.setdefault("generation", GEN)
    kw.setdefault("batch_size", 3)
    return caption_dataset(engine, [str(folder)], JobOptions(out=out, **kw), on_failure=on_failure)


def test_same_outputs_as_the_local_run_and_a_rerun_skips_everything(cluster, engine, folder, tmp_path):
    local_out, ray_out = tmp_path / "local" / "c.jsonl", tmp_path / "ray" / "c.jsonl"
    local = _run(engine, folder, local_out, workers=0)
    on_ray = _run(engine, folder, ray_out, ray=True, ray_actors=2)
    assert ray_out.read_bytes() == local_out.read_bytes()  # same records, same order, bit-identical captions
    errors = read_jsonl(ray_out.with_name("c.errors.jsonl"))
    assert [(e["path"], e["reason"]) for e in errors] == [(str(folder / "zz_not_an_image.png"),
                                                          "not a recognised image file")]
    assert (on_ray.total, on_ray.failed, on_ray.exit_status) == (local.total, 1, 1)
    assert (on_ray.captioned, on_ray.reused) == (local.captioned, local.reused) == (14, 0)  # the copy: once
    again = _run(engine, folder, ray_out, ray=True, ray_actors=2)
    assert (again.already_done, again.captioned, again.reused, again.failed) == (15, 0, 0, 1)
    assert ray_out.read_bytes() == local_out.read_bytes()


def test_self_check_on_ray_scores_as_the_local_run(cluster, folder, tmp_path):
    from vlv_engine.testing import tiny_engine

    full = tiny_engine(seed=0)
    check = SelfCheckOptions(steps=2)
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    _run(full, folder, local_out, workers=0, self_check=check, format="jsonl")
    _run(full, folder, ray_out, self_check=check, ray=True, ray_actors=1, batch_size=4)
    local, remote = read_jsonl(local_out), read_jsonl(ray_out)
    assert remote == local and all("self_check_score" in r for r in remote)


class _Stop(Exception):
    pass


def test_interrupted_driver_resumes_on_ray(cluster, engine, tmp_path):
    # The fast twin of the kill test below: the driver stops in the middle of the job
    # and leaves a torn, uncommitted record behind, as a kill during a write would.
    folder = tmp_path / "images"
    make_images(folder, 12, seed=8)
    (folder / "img0005_bad.png").write_bytes(b"\x89PNG but not really")

    def stop(item, reason):
        raise _Stop(item.path)

    out = tmp_path / "o.jsonl"
    with pytest.raises(_Stop):
        _run(engine, folder, out, ray=True, ray_actors=1, on_failure=stop)
    written = _lines(out)
    assert 0 < written < 12
    with open(out, "ab") as fp:
        fp.write(b'{"id": "torn')
    resumed = _run(engine, folder, out, ray=True, ray_actors=1)
    assert (resumed.already_done, resumed.captioned + resumed.already_done, resumed.failed) == (written, 12, 1)
    reference = tmp_path / "reference.jsonl"
    _run(engine, folder, reference, workers=0)
    assert out.read_bytes() == reference.read_bytes()
    assert read_jsonl(out.with_name("o.errors.jsonl")) == read_jsonl(tmp_path / "reference.errors.jsonl")


@pytest.mark.slow  # ~60 s on a busy 2-core machine: a driver process, its actor, then a resumed run
def test_killed_driver_resumes_with_nothing_lost_or_duplicated(cluster, tmp_path):
    folder = tmp_path / "images"
    n = 60
    make_images(folder, n, seed=4)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "vlv_engine.cli", "caption", str(folder), "--out", str(out), "--batch-size", "2",
           "--quiet", "--flush-seconds", "0", "--ray", "--ray-address", cluster, "--ray-actors", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and _lines(out) < 4:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    killed_at = _lines(out)
    assert 0 < killed_at < n, f"killed at {killed_at} of {n} lines: {err.decode()[-2000:]}"

    engine = Engine.from_pretrained(load_diffusion=False)
    resumed = caption_dataset(engine, [str(folder)], JobOptions(out=out, batch_size=2, ray=True, ray_actors=2))
    assert resumed.already_done >= killed_at - 2  # at most the uncommitted batch is redone
    assert resumed.already_done + resumed.captioned == n
    reference = tmp_path / "reference.jsonl"
    caption_dataset(engine, [str(folder)], JobOptions(out=reference, workers=0, batch_size=16))
    assert out.read_bytes() == reference.read_bytes()


def _crashing_pool_outcomes(names: list[list[str]]) -> list[list[tuple]]:
    """(sha256, reason) per item of each batch, mapped over 2 actors that die on a file
    named CRASH (``batch_helpers.CrashingEngineWorker``: an item's sha256 is its path)."""
    import batch_helpers

    from vlv_engine.batch.decode import DecodeTask
    from vlv_engine.batch.inputs import FileSource
    from vlv_engine.batch.ray_runner import _ActorPool

    ray.cloudpickle.register_pickle_by_value(batch_helpers)
    remote = ray.remote(num_cpus=1)(batch_helpers.CrashingEngineWorker)
    batches = [[DecodeTask(FileSource(f"/data/{n}.png")) for n in batch] for batch in names]
    pool = _ActorPool(ray, remote.remote, 2)
    try:
        return [[(o.sha256, o.reason) for o in r] for r in pool.map(iter(batches))]
    finally:
        pool.close()


def _only_crashes_fail(names: list[list[str]]) -> list[list[tuple]]:
    from vlv_engine.batch.decode import WORKER_CRASHED

    return [[(None, WORKER_CRASHED) if "CRASH" in n else (f"/data/{n}.png", None) for n in batch]
            for batch in names]


def test_an_actor_killed_by_a_file_costs_only_that_file(cluster):
    names = [["0", "1"], ["2", "CRASH", "3"], ["4"], ["5"], ["6"]]
    assert _crashing_pool_outcomes(names) == _only_crashes_fail(names)


def test_an_item_retried_behind_another_crash_is_not_blamed_for_it(cluster):
    """A batch's one-item retry can land on an actor with other calls queued before it; if
    one of those kills the actor, the retried item dies as a bystander. It is run again on
    a fresh actor, and only the files that crash an actor on their own are blamed; results
    stay in input order."""
    names = [["p0", "CRASH1"], ["p1"], ["CRASH2", "p2"], ["p3"], ["p4"]]
    assert _crashing_pool_outcomes(names) == _only_crashes_fail(names)


def test_without_ray_installed_the_job_says_how_to_get_it(engine, folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'vlv-engine\[ray\]'"):
        _run(engine, folder, tmp_path / "o.jsonl", ray=True)
    assert not (tmp_path / "o.jsonl").exists()


def test_options_ray_cannot_honour_are_refused(engine, folder, tmp_path):
    with pytest.raises(UsageError, match="embedding-cache"):
        _run(engine, folder, tmp_path / "o.jsonl", ray=True, embedding_cache=tmp_path / "cache")
    with pytest.raises(UsageError, match="ray-actors"):
        _run(engine, folder, tmp_path / "o.jsonl", ray=True, ray_actors=0)


def _lines(path) -> int:
    try:
        with open(path, "rb") as fp:
            return fp.read().count(b"\n")
    except FileNotFoundError:
        return 0
