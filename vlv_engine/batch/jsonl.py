"""An append-only JSONL output whose committed length lives in the manifest.

Each batch's lines are appended and fsynced, then the manifest commits the new length
(see ``manifest.py``).  On open the file is reconciled with the manifest:

* longer than committed: a kill came after the append and before the commit, or in
  the middle of the append (a torn last line).  The extra bytes are cut off; those
  items are not marked done, so they are redone and written once.
* as long as committed: nothing to do.
* shorter than committed, or present with no manifest state (the manifest was
  deleted, or a rewrite was interrupted): the file is the truth.  Its complete lines
  are read back, a torn tail is cut, and the manifest's emitted rows and results are
  rebuilt from the records.
* written under another model or generation setting (its ``binding``): it is renamed
  aside (``name.prev-MODEL-GEN.jsonl``) and a new file is started, so one file never
  mixes settings and never holds two records for one item.

A file whose lines are not ours (not JSON objects with our fields and settings,
duplicate ids, damage before the last line) is also renamed aside, never edited.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vlv_engine.batch.manifest import DONE, FAILED, Commit, Manifest, Result
from vlv_engine.batch.durable import fsync_dir, replace_atomically

__all__ = ["BASE_FIELDS", "JsonlOutput", "content_key", "encode_lines", "record_result"]

log = logging.getLogger(__name__)


#: The fields every record has (or may have: caption or reason); any other field is
#: the result's ``extra`` (``manifest.Result``), e.g. the self-check score.
BASE_FIELDS = frozenset({"id", "path", "caption", "reason", "sha256", "model", "gen"})


def record_result(record: dict[str, Any]) -> Result:
    """The manifest result a record was written from."""
    extra = {k: v for k, v in record.items() if k not in BASE_FIELDS}
    extra_text = json.dumps(extra, sort_keys=True) if extra else None
    if "caption" in record:
        return Result(DONE, caption=record["caption"], extra=extra_text)
    return Result(FAILED, reason=record.get("reason"), extra=extra_text)


def content_key(record: dict[str, Any]) -> str:
    """The manifest's content key of a record: its sha256, or a per-item key for an
    item whose bytes could not be read at all."""
    return record.get("sha256") or f"unreadable:{record['id']}"


def encode_lines(records: list[dict[str, Any]]) -> bytes:
    # A non-UTF-8 file name decodes to lone surrogates; "backslashreplace" turns them
    # into \udcXX, which is the JSON escape for the same character, so every line stays
    # valid UTF-8 JSON.
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"
                    for r in records)


class JsonlOutput:
    def __init__(self, path: str | Path, stream: str, binding: dict[str, str]) -> None:
        self.path = Path(path)
        self.stream = stream
        self.binding = binding
        self.offset = 0

    # ------------------------------------------------------------------ open

    def open(self, manifest: Manifest) -> None:
        state = manifest.stream_state(self.stream)
        size = self.path.stat().st_size if self.path.exists() else 0
        if state is not None and state.get("binding") != self.binding:
            if size:
                self._rotate(state.get("binding"))
            self._reset(manifest)
        elif state is not None and size == state["offset"]:
            self.offset = size
        elif state is not None and size > state["offset"]:
            log.info("%s: cutting %d uncommitted bytes left by an interrupted run", self.path,
                     size - state["offset"])
            os.truncate(self.path, state["offset"])
            self.offset = state["offset"]
        elif size == 0:
            self._reset(manifest)
        else:
            self._rebuild(manifest, size)

    def _reset(self, manifest: Manifest) -> None:
        self.offset = 0
        if not self.path.exists():
            # An empty job (e.g. a cluster shard that drew no items) still leaves its file.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            fsync_dir(self.path.parent)
        manifest.commit(Commit([], [], {}, {self.stream: self.state()}), forget={self.stream: None})

    def _rebuild(self, manifest: Manifest, size: int) -> None:
        records, good = _read_records(self.path, self.binding)
        if records is None:
            log.warning("%s: not a file this run can continue; renaming it aside", self.path)
            self._rotate(None)
            self._reset(manifest)
            return
        if good < size:
            log.info("%s: cutting a torn tail of %d bytes", self.path, size - good)
            os.truncate(self.path, good)
        self.offset = good
        results = [(content_key(r), record_result(r)) for r in records]
        emitted = [(r["id"], content_key(r)) for r in records]
        manifest.commit(Commit(results, [], {self.stream: emitted}, {self.stream: self.state()}),
                        forget={self.stream: None})
        log.info("%s: rebuilt the manifest's view from %d records", self.path, len(records))

    def _rotate(self, old_binding: dict[str, str] | None) -> None:
        tag = f"prev-{old_binding['model'][:8]}-{old_binding['gen'][:8]}" if old_binding else "prev"
        n = 0
        while True:
            aside = self.path.with_name(f"{self.path.stem}.{tag}{f'-{n}' if n else ''}{self.path.suffix}")
            if not aside.exists():
                break
            n += 1
        os.replace(self.path, aside)
        fsync_dir(self.path.parent)
        log.warning("%s was written with other settings; moved it to %s", self.path, aside)

    # ------------------------------------------------------------------ write

    def state(self) -> dict[str, Any]:
        return {"binding": self.binding, "offset": self.offset}

    def write(self, entries: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
        """Append the (item, record) entries' records and fsync; returns the state for
        this batch's manifest commit."""
        records = [record for _, record in entries]
        if records:
            data = encode_lines(records)
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
            self.offset += len(data)
        return self.state()

    def remove(self, manifest: Manifest, item_ids: set[str]) -> None:
        """Drop these items' records (their images changed): rewrite, then commit.
        A kill between the two leaves a shorter file, which ``open`` rebuilds from."""
        if not item_ids or not self.path.exists():
            return
        with open(self.path, "rb") as fp:
            lines = fp.read(self.offset).splitlines(keepends=True)
        kept = [ln for ln in lines if json.loads(ln)["id"] not in item_ids]
        data = b"".join(kept)
        replace_atomically(self.path, data)
        self.offset = len(data)
        manifest.commit(Commit([], [], {}, {self.stream: self.state()}), forget={self.stream: sorted(item_ids)})

    def close(self, manifest: Manifest) -> None:
        """Nothing to finish: every batch was synced when written."""


def _read_records(path: Path, binding: dict[str, str]) -> tuple[list[dict] | None, int]:
    """(records, length of the good prefix); records None when the file is not ours.

    Only what follows the last newline is a torn tail (appends end every record with
    one), and only after records of ours: a file holding nothing but an unterminated line
    is someone else's. Any bad line means the file is someone else's, and it is kept.
    Lines end at "\\n" only (bytes.splitlines would also end one at a lone "\\r", which
    our JSON lines never hold: a file with one is not ours).
    """
    with open(path, "rb") as fp:
        data = fp.read()
    *lines, tail = data.split(b"\n")  # tail: b"" when the file ends with a newline
    records: list[dict] = []
    ids: set[str] = set()
    for line in lines:
        record = _parse(line + b"\n", binding)
        if record is None or record["id"] in ids:
            return None, 0
        ids.add(record["id"])
        records.append(record)
    if tail and not records:
        return None, 0
    return records, len(data) - len(tail)


def _parse(line: bytes, binding: dict[str, str]) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None
    if record.get("model") != binding["model"] or record.get("gen") != binding["gen"]:
        return None
    return record
