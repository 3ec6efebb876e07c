"""Planning a run: which items are finished, which only need writing, which need work.

Uses the manifest only (no image is read) unless an item that an output already holds
has a new fingerprint (touched, replaced, copied): its bytes are hashed here, and if
they changed, its old records are removed before the run appends new ones, so an
output never holds two records for one item.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from vlv_engine.batch.decode import DecodeTask, decode_one
from vlv_engine.batch.inputs import Item
from vlv_engine.batch.manifest import DONE, FAILED, Commit, Manifest, Result
from vlv_engine.batch.outputs import Output

__all__ = ["Plan", "Planned", "make_plan", "unreadable_key"]

log = logging.getLogger(__name__)

_CHUNK = 2048


def unreadable_key(item_id: str) -> str:
    """The content key of an item whose bytes could not be read (no sha256 exists)."""
    return f"unreadable:{item_id}"


@dataclass(slots=True)
class Planned:
    item: Item
    sha: str | None  # content key known without reading (fingerprint unchanged)
    result: Result | None  # a finished result to write as is; None: decode / caption
    read: bool = False  # the run sends it to a decode worker


@dataclass
class Plan:
    todo: list[Planned]
    already_done: int = 0
    already_failed: int = 0


def make_plan(items: Sequence[Item], manifest: Manifest, output: Output, errors: Output, *,
              retry_failed: bool) -> Plan:
    plan = Plan([])
    for lo in range(0, len(items), _CHUNK):
        _plan_chunk(items[lo:lo + _CHUNK], manifest, output, errors, retry_failed, plan)
    return plan


def _plan_chunk(items: Sequence[Item], manifest: Manifest, output: Output, errors: Output, retry_failed: bool,
                plan: Plan) -> None:
    ids = [it.item_id for it in items]
    known = manifest.items(ids)
    in_out = manifest.emitted(output.stream, ids)
    in_err = manifest.emitted(errors.stream, ids)

    # Items an output holds whose fingerprint changed: hash them now to see whether
    # their bytes did.
    recheck = [it for it in items if (it.item_id in in_out or it.item_id in in_err)
               and known.get(it.item_id, ("",))[0] != it.fingerprint]
    shas: dict[str, str] = {}
    for it in recheck:
        shas[it.item_id] = decode_one(DecodeTask(it.source, decode=False), 1, None).sha256 \
            or unreadable_key(it.item_id)
    for it in items:
        if it.item_id not in shas and it.item_id in known and known[it.item_id][0] == it.fingerprint:
            shas[it.item_id] = known[it.item_id][1]
    if recheck:
        manifest.commit(Commit([], [(it.item_id, it.fingerprint, shas[it.item_id]) for it in recheck], {}, {}))
    results = manifest.results(shas.values())

    stale_out: set[str] = set()
    stale_err: set[str] = set()
    for it in items:
        sha = shas.get(it.item_id)
        result = results.get(sha) if sha else None
        if result is not None and result.status == FAILED and retry_failed:
            result = None
        want_out = result is not None and result.status == DONE
        want_err = result is not None and result.status == FAILED
        # A record whose content is not the item's current content, or in the wrong
        # file (a retried failure), goes; the planned work writes the right one.
        if it.item_id in in_out and not (want_out and in_out[it.item_id] == sha):
            stale_out.add(it.item_id)
        if it.item_id in in_err and not (want_err and in_err[it.item_id] == sha):
            stale_err.add(it.item_id)
        if want_out and in_out.get(it.item_id) == sha:
            plan.already_done += 1
        elif want_err and in_err.get(it.item_id) == sha:
            plan.already_failed += 1
        else:
            plan.todo.append(Planned(it, sha, result))
    if stale_out:
        log.info("%d items changed since their records were written; replacing them", len(stale_out))
        output.remove(manifest, stale_out)
    if stale_err:
        errors.remove(manifest, stale_err)
