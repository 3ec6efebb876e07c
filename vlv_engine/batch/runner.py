"""``caption_dataset``: caption a large set of images exactly once, surviving bad inputs and kills.

Per batch, in order:

1. worker processes read, hash and decode the batch's images (``decode.py``) while the
   model works on earlier batches;
2. results already known for an image's bytes (same bytes at another path, or a record
   an output lost) are reused; the rest are encoded (or their embeddings taken from the
   embedding cache) and decoded into captions, halving the batch on out-of-memory;
3. the records are written to the outputs and fsynced, then the manifest commits the
   batch (``manifest.py`` explains why this order survives a kill at any point).
   Batches are flushed together once ``flush_seconds`` have passed: one fsync pair
   costs ~10 ms here, as much as a tiny model's batch, and a kill then loses at most
   that many seconds of work.

Items are processed and written in input order, so an interrupted and resumed run
writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlv_engine.batch.decode import DecodePool, DecodeTask, Decoded
from vlv_engine.batch.embedding_cache import EmbeddingCache
from vlv_engine.batch.inputs import Item, collect_items, shard_of
from vlv_engine.batch.jsonl import JsonlOutput
from vlv_engine.batch.manifest import DONE, FAILED, Commit, Manifest, Result
from vlv_engine.batch.model_stage import ModelStage
from vlv_engine.batch.options import JobOptions, JobPaths, RunSummary, UsageError
from vlv_engine.batch.outputs import (FORMATS, Output, ParquetOutput, SidecarOutput, StreamOutput, TarOutput,
                                      sidecar_path)
from vlv_engine.batch.plan import Planned, make_plan, unreadable_key
from vlv_engine.batch.revision import Revision, engine_revision, generation_hash
from vlv_engine.batch.selfcheck import RECORD_COLUMNS, SelfCheck, SelfCheckOptions

__all__ = ["caption_dataset"]

log = logging.getLogger(__name__)

# Called for each item that fails in this run: (item, reason).
OnFailure = Callable[[Item, str], None]
# Results computed elsewhere (Ray actors) by content key; None: computed by _process.
Computed = dict[str, Result] | None


def caption_dataset(engine: Any, inputs: Sequence[str] | Sequence[Item], options: JobOptions | None = None, *,
                    on_failure: OnFailure | None = None, decode_pool: DecodePool | None = None,
                    **overrides: Any) -> RunSummary:
    """Caption every image the inputs name (specs as in ``inputs.py``, or ``Item``s)
    into ``options.out``; rerunning it finishes what is left.  Keyword arguments
    override fields of ``options``.  Raises ``UsageError`` (and ``InputSpecError``,
    ``OutputError``, ``ManifestError``) before any work when the job cannot start.

    ``decode_pool``: a ``DecodePool(options.workers)`` started before the engine was
    loaded (``vlv caption`` does this), so worker start-up overlaps the load; the
    caller closes it.  Without one, the job starts its own first thing."""
    options = _with_overrides(options or JobOptions(), overrides)
    with contextlib.ExitStack() as stack:
        if decode_pool is None and not options.ray:
            decode_pool = stack.enter_context(DecodePool(options.workers)).start()
        return _caption_dataset(engine, inputs, options, on_failure, decode_pool)


def _caption_dataset(engine: Any, inputs: Sequence[str] | Sequence[Item], options: JobOptions,
                     on_failure: OnFailure | None, decode_pool: DecodePool | None) -> RunSummary:
    if options.format not in FORMATS:
        raise UsageError(f"unknown output format {options.format!r}; choose from {', '.join(FORMATS)}")
    if options.batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {options.batch_size}")
    try:
        generation = engine.generation_config(**options.generation)
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    self_check = make_self_check(engine, options.self_check)
    if options.ray:
        from vlv_engine.batch.ray_runner import check_ray_job

        check_ray_job(options)  # before any work: ray installed, options it supports
    paths = JobPaths.resolve(options)
    items = _select(inputs, options)
    if options.format == "txt":
        _check_sidecars(items)
    if options.format == "tar":
        _check_tar_keys(items)
    revision = engine_revision(engine)
    binding = {"model": revision.model,
               "gen": generation_hash(generation, extra=self_check.key() if self_check else None)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlv-caption-") as scratch:
        manifest_path = paths.manifest or Path(scratch) / "manifest.sqlite"
        with Manifest(manifest_path, model=binding["model"], gen=binding["gen"]) as manifest:
            output = _make_output(options, paths, binding)
            errors: Output = JsonlOutput(paths.errors or Path(scratch) / "errors.jsonl", "errors", binding)
            output.open(manifest)
            errors.open(manifest)
            if options.ray:
                from vlv_engine.batch.ray_runner import RayRun

                run = RayRun(engine, options, manifest, output, errors, revision, generation, on_failure,
                             self_check)
            else:
                run = _Run(engine, options, manifest, output, errors, revision, generation, on_failure, self_check,
                           decode_pool)
            summary = run.run(items)
    summary.seconds = time.perf_counter() - started
    summary.paths = paths
    log.info("caption job: %d items, %d already done, %d captioned, %d reused, %d failed, %.1f s",
             summary.total, summary.already_done, summary.captioned, summary.reused, summary.failed,
             summary.seconds)
    return summary


def make_self_check(engine: Any, option: SelfCheckOptions | bool | None) -> SelfCheck | None:
    """The job's self-check (None when off); ``True`` means the default settings."""
    if not option:
        return None
    try:
        return SelfCheck(engine, SelfCheckOptions() if option is True else option)
    except ValueError as exc:
        raise UsageError(f"--self-check: {exc}") from None


def _with_overrides(options: JobOptions, overrides: dict[str, Any]) -> JobOptions:
    if not overrides:
        return options
    unknown = set(overrides) - {f.name for f in dataclasses.fields(JobOptions)}
    if unknown:
        raise TypeError(f"unknown job option(s): {sorted(unknown)}")
    return dataclasses.replace(options, **overrides)


def _select(inputs: Sequence[str] | Sequence[Item], options: JobOptions) -> list[Item]:
    if options.num_shards < 1 or not 0 <= options.shard_index < options.num_shards:
        raise UsageError(f"shard index {options.shard_index} is not in [0, {options.num_shards})")
    if inputs and all(isinstance(x, Item) for x in inputs):
        seen: set[str] = set()
        items = [it for it in inputs if not (it.item_id in seen or seen.add(it.item_id))]  # type: ignore[union-attr]
        return [it for it in items if options.num_shards == 1
                or shard_of(it.item_id, options.num_shards) == options.shard_index]
    return collect_items([str(x) for x in inputs], image_column=options.image_column,
                         shard_index=options.shard_index, num_shards=options.num_shards)


def _check_sidecars(items: list[Item]) -> None:
    _check_unique(items, sidecar_path, "write")


def _check_tar_keys(items: list[Item]) -> None:
    # A webdataset sample is its key: two images under one key (a.png and a.jpg, x.b.png
    # and x_b.png, or member 000001 of two input shards) would be one sample with two
    # captions, and a reader could not tell which is whose.
    _check_unique(items, lambda it: it.key, "be tar sample",
                  "; rename one, or write jsonl or parquet (keyed by the full path)")


def _check_unique(items: list[Item], target_of, verb: str, advice: str = "") -> None:
    """Refuse two items with one output target (a sidecar file, a tar sample key)."""
    owners: dict[str, str] = {}
    for it in items:
        target = target_of(it)
        if target in owners:
            raise UsageError(f"{owners[target]} and {it.path} would both {verb} {target!r}{advice}")
        owners[target] = it.path


def _make_output(options: JobOptions, paths: JobPaths, binding: dict[str, str]) -> Output:
    if options.format == "txt":
        return SidecarOutput(binding)
    if options.format == "tar":
        return TarOutput(paths.out, paths.tar_prefix, binding, max_per_shard=options.tar_max_per_shard)
    if options.format == "parquet":
        return ParquetOutput(paths.out, binding, extra_columns=RECORD_COLUMNS if options.self_check else None)
    if paths.out is None:
        return StreamOutput(options.stream or sys.stdout)
    return JsonlOutput(paths.out, "out", binding)


class _Run:
    def __init__(self, engine: Any, options: JobOptions, manifest: Manifest, output: Output, errors: Output,
                 revision: Revision, generation: Any, on_failure: OnFailure | None,
                 self_check: SelfCheck | None = None, decode_pool: DecodePool | None = None) -> None:
        self.engine = engine
        self.options = options
        self.decode_pool = decode_pool
        self.manifest = manifest
        self.output = output
        self.errors = errors
        self.binding = {"model": manifest.model, "gen": manifest.gen}
        self.generation = generation
        self.on_failure = on_failure
        self.cache = (EmbeddingCache(options.embedding_cache, revision.encoder)
                      if options.embedding_cache else None)
        self.model = ModelStage(engine, options.generation, options.batch_size, cache=self.cache,
                                self_check=self_check)
        self.summary = RunSummary()
        self.pending = _Pending()
        self.last_flush = time.monotonic()

    def run(self, items: list[Item]) -> RunSummary:
        plan = make_plan(items, self.manifest, self.output, self.errors, retry_failed=self.options.retry_failed)
        s = self.summary
        s.total, s.already_done, s.failed = len(items), plan.already_done, plan.already_failed
        log.info("caption job: %d items, %d finished earlier, %d to do", len(items),
                 plan.already_done + plan.already_failed, len(plan.todo))
        batches = [plan.todo[i:i + self.options.batch_size]
                   for i in range(0, len(plan.todo), self.options.batch_size)]
        progress = _progress(len(plan.todo), self.options.progress)
        try:
            with contextlib.closing(self._stream(batches)) as stream:
                try:
                    for batch, decoded, computed in stream:
                        self._process(batch, decoded, computed)
                        progress.update(len(batch))
                        progress.set_postfix(failed=s.failed, refresh=False)
                finally:
                    self._flush()  # finished batches are kept even when a later one raised
            self.output.close(self.manifest)
            self.errors.close(self.manifest)
        finally:
            progress.close()
            if self.cache is not None:
                self.cache.close()
        return s

    def _stream(self, batches: list[list[Planned]]) -> Iterator[tuple[list[Planned], list[Decoded], Computed]]:
        """Each batch with its decoded items, in order; decode workers run ahead.  The
        model runs in ``_process`` (``Computed`` None); the Ray runner overrides this to
        return results its actors computed."""
        pool = self.decode_pool
        if pool.workers != self.options.workers:
            raise UsageError(f"the decode pool has {pool.workers} workers; the job asks for {self.options.workers}")
        pool.size = self.engine.config.encoder.image_size
        pool.max_pixels = self.options.max_pixels
        if self.options.max_in_flight:
            pool.max_in_flight = self.options.max_in_flight
        for batch, decoded in zip(batches, pool.map(self._tasks(b) for b in batches)):
            yield batch, decoded, None

    def _tasks(self, batch: list[Planned]) -> list[DecodeTask]:
        # Decided once, here: the cache grows while this batch waits in the pool.
        for p in batch:
            p.read = self._needs_read(p)
        return [DecodeTask(p.item.source) for p in batch if p.read]

    def _needs_read(self, p: Planned) -> bool:
        # A known hash (unchanged fingerprint) with a cached embedding needs no bytes.
        return p.result is None and self.model.needs_pixels(p.sha)

    # ------------------------------------------------------------------ one batch

    def _process(self, batch: list[Planned], decoded: list[Decoded], computed: Computed = None) -> None:
        reads = iter(decoded)
        keys: list[str] = []
        pixels: dict[str, np.ndarray] = {}
        reasons: dict[str, str] = {}
        read_items: list[tuple[str, str, str]] = []
        for p in batch:
            if not p.read:
                keys.append(p.sha)  # type: ignore[arg-type]  # set whenever no read is needed
                continue
            d = next(reads)
            key = d.sha256 or unreadable_key(p.item.item_id)
            keys.append(key)
            read_items.append((p.item.item_id, p.item.fingerprint, key))
            if d.reason is not None:
                reasons[key] = d.reason
            elif d.pixels is not None:
                pixels[key] = d.pixels

        known = self.manifest.results(k for p, k in zip(batch, keys) if p.result is None)
        if self.options.retry_failed:
            known = {k: r for k, r in known.items() if r.status == DONE}
        new: dict[str, Result] = {k: Result(FAILED, reason=r) for k, r in reasons.items() if k not in known}
        todo = sorted({k for p, k in zip(batch, keys)
                       if p.result is None and k not in known and k not in new})
        if computed is None:
            new.update(zip(todo, self.model.results(todo, pixels)))
        else:
            new.update((k, computed[k]) for k in todo)
        self.summary.captioned += len(todo)

        out_entries, err_entries = [], []
        emitted: dict[str, list[tuple[str, str]]] = {self.output.stream: [], self.errors.stream: []}
        for p, key in zip(batch, keys):
            result = p.result or known.get(key) or new[key]
            if key not in new:
                self.summary.reused += 1
            record = self._record(p.item, key, result)
            if result.status == DONE:
                self.summary.flagged += bool(record.get("self_check_low"))
                out_entries.append((p.item, record))
                emitted[self.output.stream].append((p.item.item_id, key))
            else:
                err_entries.append((p.item, record))
                emitted[self.errors.stream].append((p.item.item_id, key))
                self.summary.failed += 1
                if self.on_failure is not None:
                    self.on_failure(p.item, result.reason or "")
        pending = self.pending
        pending.out.extend(out_entries)
        pending.err.extend(err_entries)
        pending.commit.results.extend(new.items())
        pending.commit.items.extend(read_items)
        for stream, rows in emitted.items():
            pending.commit.emitted.setdefault(stream, []).extend(rows)
        if time.monotonic() - self.last_flush >= self.options.flush_seconds:
            self._flush()

    def _flush(self) -> None:
        # Taken first: if a signal lands mid-flush, the same records are never written
        # twice; the next run cuts whatever was written and not committed.
        p, self.pending = self.pending, _Pending()
        self.last_flush = time.monotonic()
        if not (p.out or p.err or p.commit.results or p.commit.items):
            return
        # Outputs first, fsynced; the manifest commit after them makes the batches done.
        p.commit.streams[self.output.stream] = self.output.write(p.out)
        p.commit.streams[self.errors.stream] = self.errors.write(p.err)
        self.manifest.commit(p.commit)

    def _record(self, item: Item, key: str, result: Result) -> dict[str, Any]:
        record: dict[str, Any] = {"id": item.item_id, "path": item.path}
        if result.status == DONE:
            record["caption"] = result.caption
        else:
            record["reason"] = result.reason
        record["sha256"] = None if key == unreadable_key(item.item_id) else key
        record.update(self.binding)
        record.update(result.extra_fields())
        return record


class _Pending:
    """Batches computed and not yet flushed: their records and their manifest rows."""

    def __init__(self) -> None:
        self.out: list[tuple[Item, dict[str, Any]]] = []
        self.err: list[tuple[Item, dict[str, Any]]] = []
        self.commit = Commit.empty()


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="captioning", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)
