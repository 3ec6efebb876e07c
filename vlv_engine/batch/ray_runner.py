"""The batch captioning job scaled out on Ray: a pool of engine actors, one driver.

The driver is the local runner (``runner._Run``) with its compute moved out: it plans
the job from the manifest, hands each batch's reads to an actor, and processes the
results *in input order* exactly as the local run does (content keys looked up in the
manifest, records written and fsynced, then the manifest committed), so the manifest
semantics and the output files are the local run's: done items are skipped, failures
are recorded with their reasons, a killed driver resumes with nothing lost or
duplicated, and the captions are bit-identical (the engine is batch-invariant).

Each actor (``EngineWorker``) holds one engine (one per GPU, or per CPU slot): it
reads, hashes and decodes a batch's images itself (``decode.decode_batch``, next to
its model: no pixels cross the cluster) and computes their results with the local
runner's ``ModelStage`` (encoder, caption decoder, self-check).  The driver keeps at
most two batches per actor in flight: enough that no actor waits for the driver, and
a bound on the results held in memory.

Why actors and not Ray Data's ``map_batches``: the driver must commit batches in input
order and know which manifest commit each result belongs to.  Ray Data re-blocks
rows between stages and streams blocks back out of order unless told to preserve it,
and its output would still have to come back to the driver for the manifest, so it
would add a scheduler between the driver and an actor pool without taking any work
off either.

What differs from the local run: an image whose bytes equal an already captioned
image's (another path) is computed again by its actor, because an actor cannot see
the manifest; the driver still writes the manifest's result, so the output is the
same.  An actor killed by a hostile file (a crashing decoder) is replaced and its
batch is retried one item per call, so only that item fails, as with decode workers.
The embedding cache is local to the driver and is not used on Ray (refused).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlv_engine.batch.decode import WORKER_CRASHED, DecodeTask, Decoded, decode_batch
from vlv_engine.batch.manifest import Result
from vlv_engine.batch.options import JobOptions, UsageError
from vlv_engine.batch.plan import Planned
from vlv_engine.batch.runner import Computed, _Run

__all__ = ["EngineWorker", "Outcome", "RayRun", "check_ray_job", "import_ray"]

log = logging.getLogger(__name__)

_IN_FLIGHT_PER_ACTOR = 2


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'vlv-engine[ray]' (or pip install 'ray[data]')") from None
    return ray


def check_ray_job(options: JobOptions) -> None:
    """Refuse, before any work, what the Ray runner cannot do."""
    import_ray()
    if options.embedding_cache:
        raise UsageError("--embedding-cache is kept by one process and cannot be used with --ray")
    if options.ray_actors is not None and options.ray_actors < 1:
        raise UsageError(f"--ray-actors must be >= 1, got {options.ray_actors}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One read item as an actor left it."""

    sha256: str | None  # None: unreadable
    reason: str | None = None  # it failed (not an image, too large, ...)
    result: Result | None = None  # DONE result when it was captioned


class EngineWorker:
    """An engine in an actor: reads, decodes and captions whole batches."""

    def __init__(self, engine_source: Any, generation: dict[str, Any], batch_size: int, max_pixels: int | None,
                 self_check: Any, threads: int) -> None:
        import torch

        from vlv_engine.batch.model_stage import ModelStage
        from vlv_engine.batch.revision import engine_revision, generation_hash
        from vlv_engine.batch.selfcheck import SelfCheck

        torch.set_num_threads(max(1, threads))
        engine = engine_source() if callable(engine_source) else engine_source
        check = SelfCheck(engine, self_check) if self_check is not None else None
        self.binding = {"model": engine_revision(engine).model,
                        "gen": generation_hash(engine.generation_config(**generation),
                                               extra=check.key() if check else None)}
        self.size = engine.config.encoder.image_size
        self.max_pixels = max_pixels
        self.stage = ModelStage(engine, generation, batch_size, self_check=check)

    def identity(self) -> dict[str, Any]:
        """What the driver checks: the same model and settings as its own, and where."""
        return {**self.binding, "pid": os.getpid()}

    def run(self, tasks: list[DecodeTask]) -> list[Outcome]:
        decoded = decode_batch(tasks, self.size, self.max_pixels)
        pixels = {d.sha256: d.pixels for d in decoded if d.pixels is not None and d.reason is None}
        keys = sorted(pixels)  # duplicates within the batch computed once
        results = dict(zip(keys, self.stage.results(keys, pixels)))
        return [Outcome(d.sha256, d.reason, results.get(d.sha256) if d.reason is None else None) for d in decoded]


class RayRun(_Run):
    """``_Run`` with the decode workers and the model replaced by Ray actors."""

    def __init__(self, engine: Any, options: JobOptions, manifest: Any, output: Any, errors: Any, revision: Any,
                 generation: Any, on_failure: Any, self_check: Any = None) -> None:
        super().__init__(engine, options, manifest, output, errors, revision, generation, on_failure, self_check)
        self.self_check_options = self_check.options if self_check is not None else None

    def _stream(self, batches: list[list[Planned]]) -> Iterator[tuple[list[Planned], list[Decoded], Computed]]:
        if not batches:
            return
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            address = self.options.ray_address
            ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
        pool = _ActorPool(ray, self._actor_factory(ray), self._num_actors(ray))
        try:
            pool.start(self.binding)
            for batch, outcomes in zip(batches, pool.map(self._tasks(b) for b in batches)):
                decoded = [Decoded(o.sha256, reason=o.reason) for o in outcomes]
                computed = {o.sha256: o.result for o in outcomes if o.result is not None}
                yield batch, decoded, computed
        finally:
            pool.close()
            if started_here:
                ray.shutdown()

    def _gpus_per_actor(self, ray: Any) -> float:
        if self.options.ray_gpus_per_actor is not None:
            return self.options.ray_gpus_per_actor
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _num_actors(self, ray: Any) -> int:
        if self.options.ray_actors:
            return self.options.ray_actors
        resources = ray.cluster_resources()
        gpus = self._gpus_per_actor(ray)
        if gpus:
            return max(1, int(resources.get("GPU", 0) // gpus))
        return max(1, int(resources.get("CPU", 1)))

    def _actor_factory(self, ray: Any) -> Any:
        gpus = self._gpus_per_actor(ray)
        # One CPU slot per actor; a GPU actor's CPU threads only feed the GPU.
        remote_cls = ray.remote(num_cpus=1, num_gpus=gpus)(EngineWorker)
        engine_source = self.options.engine_factory or ray.put(self.engine)
        args = (engine_source, dict(self.options.generation), self.options.batch_size, self.options.max_pixels,
                self.self_check_options, 1)

        def make() -> Any:
            # A put engine arrives as its ObjectRef and is resolved by Ray before __init__.
            return remote_cls.remote(*args)

        return make


class _ActorPool:
    """An ordered, bounded map of batches over engine actors; an actor that dies is
    replaced and its batch retried one item per call, so a file that kills an actor
    costs that file only.

    Who killed an actor: an actor runs its calls in order, so the calls in flight on it
    other than the one it was running died as bystanders. The map pops calls in
    submission order, so the first failed call it reaches on a dead actor is the one that
    was running: its batch is isolated, the others are sent again as they were. An item
    is blamed only when it kills an actor it runs on alone, with nothing queued there
    before it (a fresh one). Each actor slot has a generation, so a call made to an actor
    that was already replaced never brings down its healthy successor."""

    def __init__(self, ray: Any, make_actor: Any, n: int) -> None:
        self.ray = ray
        self.make_actor = make_actor
        self.actors: list[Any] = [make_actor() for _ in range(n)]
        self.generation = [0] * n
        self.load = collections.Counter()  # actor index -> calls in flight
        # (tasks, actor index, generation, ref) of every call in flight, in submission order.
        self.pending: collections.deque[tuple[list[DecodeTask], int, int, Any]] = collections.deque()

    def start(self, binding: dict[str, str]) -> None:
        for identity in self.ray.get([a.identity.remote() for a in self.actors]):
            got = {k: identity[k] for k in binding}
            if got != binding:
                raise RuntimeError(f"a Ray actor's engine is not the driver's (actor {got}, driver {binding}): "
                                   "give the actors the same model, dtype and settings")
        log.info("ray: %d engine actors ready", len(self.actors))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def _call(self, tasks: list[DecodeTask]) -> tuple[list[DecodeTask], int, int, Any]:
        index = min(range(len(self.actors)), key=lambda i: self.load[i])
        self.load[index] += 1
        return tasks, index, self.generation[index], self.actors[index].run.remote(tasks)

    def _submit(self, tasks: list[DecodeTask]) -> None:
        self.pending.append(self._call(tasks))

    def map(self, batches: Iterator[list[DecodeTask]]) -> Iterator[list[Outcome]]:
        limit = _IN_FLIGHT_PER_ACTOR * len(self.actors)
        exhausted = False
        while self.pending or not exhausted:
            while not exhausted and len(self.pending) < limit:
                tasks = next(batches, None)
                if tasks is None:
                    exhausted = True
                else:
                    self._submit(tasks)
            if not self.pending:
                break
            tasks, index, generation, ref = self.pending.popleft()
            try:
                outcomes = self.ray.get(ref)
                self.load[index] -= 1
            except self.ray.exceptions.RayActorError:
                log.warning("a Ray engine actor died on a batch of %d; retrying it one item at a time", len(tasks))
                self._replace(index, generation)
                self._resend(index, generation)
                outcomes = self._isolate(tasks)
            yield outcomes

    def _replace(self, index: int, generation: int) -> None:
        """A new actor in slot `index` if `generation` is still the one there."""
        if self.generation[index] != generation:
            return
        self.ray.kill(self.actors[index])
        self.actors[index] = self.make_actor()
        self.generation[index] += 1
        self.load[index] = 0

    def _resend(self, index: int, generation: int) -> None:
        """Send again the calls in flight on a dead actor (they died with it), each in its
        place: the map yields in input order."""
        self.pending = collections.deque(self._call(e[0]) if e[1:3] == (index, generation) else e
                                         for e in self.pending)

    def _isolate(self, tasks: list[DecodeTask]) -> list[Outcome]:
        out: list[Outcome] = []
        for task in tasks:
            index = min(range(len(self.actors)), key=lambda i: self.load[i])  # a quiet one if any
            generation = self.generation[index]
            try:
                out.extend(self.ray.get(self.actors[index].run.remote([task])))
                continue
            except self.ray.exceptions.RayActorError:
                # This item, or a call queued before it there, killed the actor: run it again
                # alone on the fresh replacement (nothing is sent to it meanwhile).
                self._replace(index, generation)
                retry = self.generation[index]
                try:
                    out.extend(self.ray.get(self.actors[index].run.remote([task])))
                except self.ray.exceptions.RayActorError:
                    self._replace(index, retry)
                    out.append(Outcome(None, reason=WORKER_CRASHED))
                finally:
                    self._resend(index, generation)  # the bystanders of the first death
        return out
