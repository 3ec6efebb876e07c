"""The manifest: what is done, what failed, and what each output already holds.

Results are keyed by (image sha256, model revision, generation hash): the same bytes
under another path are not captioned twice, and only a model or settings change
captions an image again.  Besides results it holds each item's last fingerprint and
content hash (so a rerun skips unchanged files without reading them), which items
each output already contains (``emitted``), and each output's committed state (e.g.
the byte length of a JSONL file).

Why SQLite (WAL, ``synchronous=FULL``) and not a JSONL journal: one batch's results,
emitted rows and output offsets must land together or not at all, and SQLite commits
them in one atomic, fsynced transaction; a kill at any moment leaves the last
committed state, with no torn tail for us to repair.  Lookups are indexed, so a
manifest of millions of items is not replayed into memory at start, and it is in the
standard library.  ``locking_mode=EXCLUSIVE`` is set before WAL: SQLite then keeps
the WAL index in process memory instead of a shared-memory file, which is what makes
WAL safe on network filesystems (cluster arrays write to NFS / Lustre), and a second
run on the same manifest fails at once instead of interleaving with the first.  Each
shard of a cluster array has its own manifest, so the lock is never contended.

Ordering contract with the outputs (see ``outputs.py``): a batch's output records are
written and fsynced first, then its manifest transaction commits.  A kill between the
two leaves output bytes past the committed length; the next run cuts them off.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DONE", "FAILED", "Commit", "Manifest", "ManifestError", "Result"]

DONE, FAILED = "done", "failed"
# 2: results.extra (fields a record carries besides the caption, e.g. the self-check
# score).  A version-1 manifest gets the column on open; older code refuses version 2.
SCHEMA_VERSION = 2
_CHUNK = 500  # below SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    sha256 TEXT NOT NULL, model TEXT NOT NULL, gen TEXT NOT NULL,
    status TEXT NOT NULL, caption TEXT, reason TEXT, extra TEXT,
    PRIMARY KEY (sha256, model, gen)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, sha256 TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS emitted (
    stream TEXT NOT NULL, item_id TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (stream, item_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (name TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
"""


class ManifestError(RuntimeError):
    """The manifest cannot be used (locked by another run, newer schema, not SQLite)."""


@dataclass(frozen=True, slots=True)
class Result:
    status: str  # DONE or FAILED
    caption: str | None = None
    reason: str | None = None
    # Further record fields as JSON text (``extra_fields``), e.g. the self-check score;
    # text, not a dict, so a Result stays hashable and is stored as it is.
    extra: str | None = None

    def extra_fields(self) -> dict[str, Any]:
        return json.loads(self.extra) if self.extra else {}


@dataclass
class Commit:
    """Everything one batch changes, committed in one transaction."""

    results: list[tuple[str, Result]]  # (sha256, result) under the manifest's model / gen
    items: list[tuple[str, str, str]]  # (item_id, fingerprint, sha256)
    emitted: dict[str, list[tuple[str, str]]]  # stream -> [(item_id, sha256)]
    streams: dict[str, dict[str, Any]]  # stream -> its committed state

    @classmethod
    def empty(cls) -> "Commit":
        return cls([], [], {}, {})


class Manifest:
    def __init__(self, path: str | Path, *, model: str, gen: str) -> None:
        self.path = Path(path)
        self.model, self.gen = model, gen
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Take the lock now: a second run on this manifest fails here, before any work.
            self._db.execute("BEGIN EXCLUSIVE")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise ManifestError(f"{self.path}: manifest schema {row[0]} is newer than this vlv-engine's "
                                    f"({SCHEMA_VERSION})")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(results)")}
            if "extra" not in columns:
                self._db.execute("ALTER TABLE results ADD COLUMN extra TEXT")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise ManifestError(f"{self.path} is in use by another run (one run per manifest; "
                                    "give each shard its own)") from None
            raise ManifestError(f"{self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ManifestError(f"{self.path} is not a usable manifest ({exc})") from None
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reads

    def items(self, item_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """item_id -> (fingerprint, sha256) as last seen."""
        keys = {_key(i): i for i in item_ids}
        rows = self._select("SELECT item_id, fingerprint, sha256 FROM items WHERE item_id IN ({})", list(keys))
        return {keys[r[0]]: (r[1], _unkey(r[2])) for r in rows}

    def results(self, shas: Iterable[str]) -> dict[str, Result]:
        """sha256 -> result under this manifest's model and generation settings."""
        keys = {_key(s): s for s in shas}
        rows = self._select("SELECT sha256, status, caption, reason, extra FROM results WHERE model=? AND gen=? "
                            "AND sha256 IN ({})", sorted(keys), (self.model, self.gen))
        return {keys[r[0]]: Result(r[1], r[2], r[3], r[4]) for r in rows}

    def emitted(self, stream: str, item_ids: Sequence[str]) -> dict[str, str]:
        """item_id -> sha256 of the record that output stream already holds."""
        keys = {_key(i): i for i in item_ids}
        rows = self._select("SELECT item_id, sha256 FROM emitted WHERE stream=? AND item_id IN ({})",
                            list(keys), (stream,))
        return {keys[r[0]]: _unkey(r[1]) for r in rows}

    def stream_state(self, stream: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT state FROM streams WHERE name=?", (stream,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _select(self, sql: str, keys: Sequence[str], params: tuple = ()) -> list[tuple]:
        out: list[tuple] = []
        keys = list(keys)
        for lo in range(0, len(keys), _CHUNK):
            chunk = keys[lo:lo + _CHUNK]
            out.extend(self._db.execute(sql.format(",".join("?" * len(chunk))), (*params, *chunk)))
        return out

    # ------------------------------------------------------------------ writes

    def commit(self, commit: Commit, *, forget: dict[str, Sequence[str] | None] | None = None) -> None:
        """Apply one batch atomically.  ``forget`` drops emitted rows first (a stream's
        listed items, or all of it for None): records removed from an output."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for stream, ids in (forget or {}).items():
                if ids is None:
                    db.execute("DELETE FROM emitted WHERE stream=?", (stream,))
                else:
                    db.executemany("DELETE FROM emitted WHERE stream=? AND item_id=?",
                                   [(stream, _key(i)) for i in ids])
            db.executemany("INSERT OR REPLACE INTO results (sha256, model, gen, status, caption, reason, extra) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(_key(sha), self.model, self.gen, r.status, _text(r.caption), _text(r.reason), r.extra)
                            for sha, r in commit.results])
            db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?)",
                           [(_key(i), fp, _key(sha)) for i, fp, sha in commit.items])
            for stream, rows in commit.emitted.items():
                db.executemany("INSERT OR REPLACE INTO emitted VALUES (?, ?, ?)",
                               [(stream, _key(item_id), _key(sha)) for item_id, sha in rows])
            db.executemany("INSERT OR REPLACE INTO streams VALUES (?, ?)",
                           [(name, json.dumps(state, sort_keys=True)) for name, state in commit.streams.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


# A file name that is not valid UTF-8 decodes to lone surrogates, which SQLite's UTF-8
# text cannot hold.  Such keys are stored as a hex spelling behind a NUL, which no
# path or hash contains, so keys stay distinct and round-trip exactly.
_RAW = "\0raw:"


def _key(s: str) -> str:
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _RAW + s.encode("utf-8", "surrogateescape").hex()


def _unkey(s: str) -> str:
    return bytes.fromhex(s[len(_RAW):]).decode("utf-8", "surrogateescape") if s.startswith(_RAW) else s


def _text(s: str | None) -> str | None:
    # Free text (a reason quoting a file name): readable beats exact here.
    return None if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")
