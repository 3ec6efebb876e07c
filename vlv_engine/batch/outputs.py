"""Where captions go: JSONL (default), ``.txt`` sidecars, webdataset tar shards, parquet.

Every output is a manifest *stream* with the same life cycle: ``open`` reconciles the
files with the manifest's committed state, ``write`` makes one batch durable (fsync)
and returns the state to commit with the batch, ``close`` finishes the files.  Writing
before committing is what makes a kill safe; see ``manifest.py``.

* ``jsonl``: ``jsonl.JsonlOutput``, one record per item, append-only.
* ``txt``: ``image.txt`` next to ``image.png`` (kohya style), each written to a temp
  file, fsynced and renamed over the target, so a sidecar is never half written.
  Rewriting a sidecar is idempotent, so a kill can at worst cause one rewrite.
* ``tar``: shards ``PREFIX-000000.tar`` with ``KEY.txt`` (the caption) and
  ``KEY.json`` (the record) per item, keyed like the inputs.  The committed state is
  (shard, byte length); on open the current shard is cut back to it and uncommitted
  later shards are deleted.  A shard is closed with the end-of-archive blocks when it
  is full or the run ends; they lie past the committed length, so a later run cuts
  them and appends.  The prefix names the model and settings, so other settings
  write other shards.
* ``parquet``: a JSONL staging file (exactly once, as above) turned into the parquet
  file, atomically, when the run ends: parquet files cannot be appended to.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Protocol

from vlv_engine.batch.durable import fsync_dir, replace_atomically
from vlv_engine.batch.inputs import FileSource, Item
from vlv_engine.batch.jsonl import JsonlOutput, encode_lines
from vlv_engine.batch.manifest import Commit, Manifest

__all__ = ["FORMATS", "Output", "OutputError", "ParquetOutput", "SidecarOutput", "StreamOutput", "TarOutput",
           "sidecar_path"]

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "txt", "tar", "parquet")
_EOF = b"\0" * (2 * tarfile.BLOCKSIZE)


class OutputError(RuntimeError):
    """An output that cannot be used as asked (a usage error: exit status 2)."""


class Output(Protocol):
    stream: str

    def open(self, manifest: Manifest) -> None: ...
    def write(self, entries: list[tuple[Item, dict[str, Any]]]) -> dict[str, Any]: ...
    def remove(self, manifest: Manifest, item_ids: set[str]) -> None: ...
    def close(self, manifest: Manifest) -> None: ...


def sidecar_path(item: Item) -> str:
    if not isinstance(item.source, FileSource):
        raise OutputError(f"{item.path}: .txt sidecars need image files, not tar members or parquet rows")
    return _sidecar_of(item.source.path)


def _sidecar_of(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".txt"


class SidecarOutput:
    stream = "txt"

    def __init__(self, binding: dict[str, str]) -> None:
        self.binding = binding

    def open(self, manifest: Manifest) -> None:
        state = manifest.stream_state(self.stream)
        if state is None or state.get("binding") != self.binding:
            # Other settings: every sidecar is rewritten with the new captions.
            manifest.commit(Commit([], [], {}, {self.stream: self.state()}), forget={self.stream: None})

    def state(self) -> dict[str, Any]:
        return {"binding": self.binding}

    def write(self, entries: list[tuple[Item, dict[str, Any]]]) -> dict[str, Any]:
        folders = set()
        for item, record in entries:
            target = sidecar_path(item)
            replace_atomically(target, record["caption"].encode("utf-8"), sync_dir=False)
            folders.add(os.path.dirname(target) or ".")
        for folder in folders:  # once per folder per batch, not once per file
            fsync_dir(folder)
        return self.state()

    def remove(self, manifest: Manifest, item_ids: set[str]) -> None:
        # These images changed: their sidecars go now, or one whose new bytes fail would
        # keep the old caption beside a manifest and errors file that say it failed. (A
        # file item's id is its absolute path; a kill before the commit redoes this.)
        folders = set()
        for item_id in item_ids:
            target = _sidecar_of(item_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
                folders.add(os.path.dirname(target) or ".")
        for folder in folders:
            fsync_dir(folder)
        manifest.commit(Commit.empty(), forget={self.stream: sorted(item_ids)})

    def close(self, manifest: Manifest) -> None:
        """Nothing to finish: each sidecar was complete and synced when written."""


class TarOutput:
    stream = "tar"

    def __init__(self, folder: str | Path, prefix: str, binding: dict[str, str], *,
                 max_per_shard: int = 10_000) -> None:
        self.folder = Path(folder)
        self.prefix = f"{prefix}-{binding['model'][:8]}-{binding['gen'][:8]}"
        self.binding = binding
        self.max_per_shard = max_per_shard
        self.shard = self.offset = self.count = 0

    def shard_path(self, n: int) -> Path:
        return self.folder / f"{self.prefix}-{n:06d}.tar"

    def state(self) -> dict[str, Any]:
        return {"binding": self.binding, "shard": self.shard, "offset": self.offset, "count": self.count}

    def open(self, manifest: Manifest) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = manifest.stream_state(self.stream)
        ours = sorted(self.folder.glob(f"{self.prefix}-*.tar"))
        if state is None or state.get("binding") != self.binding:
            if ours:
                raise OutputError(f"{self.folder} already holds {ours[0].name}, which this manifest did not "
                                  "write; use the manifest that wrote it or another output folder")
            manifest.commit(Commit([], [], {}, {self.stream: self.state()}), forget={self.stream: None})
            return
        self.shard, self.offset, self.count = state["shard"], state["offset"], state["count"]
        # Finished shards are never touched again; one that is gone took its captions with
        # it while the manifest still counts them done.
        missing = [self.shard_path(n).name for n in range(self.shard) if not self.shard_path(n).exists()]
        if missing:
            raise OutputError(f"{self.folder} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, "
                              "finished by this manifest: their captions are gone. Restore them, or caption "
                              "again into a new output folder with a new manifest")
        current = self.shard_path(self.shard)
        size = current.stat().st_size if current.exists() else 0
        if size < self.offset:
            raise OutputError(f"{current} is shorter than the manifest says ({size} < {self.offset} bytes): "
                              "it was changed by something else")
        if size > self.offset:
            os.truncate(current, self.offset)  # uncommitted members, or the end-of-archive blocks
        for path in ours:
            match = re.fullmatch(rf"{re.escape(self.prefix)}-(\d+)\.tar", path.name)
            if match and int(match.group(1)) > self.shard:
                path.unlink()  # started by a run that was killed before committing it

    def write(self, entries: list[tuple[Item, dict[str, Any]]]) -> dict[str, Any]:
        while entries:
            room = self.max_per_shard - self.count
            self._append(entries[:room])
            entries = entries[room:]
        return self.state()

    def _append(self, entries: list[tuple[Item, dict[str, Any]]]) -> None:
        buf = io.BytesIO()
        for item, record in entries:
            _add_member(buf, f"{item.key}.txt", record["caption"].encode("utf-8"))
            _add_member(buf, f"{item.key}.json", encode_lines([record]))
        path = self.shard_path(self.shard)
        created = not path.exists()
        full = self.count + len(entries) >= self.max_per_shard
        with open(path, "ab") as fp:
            fp.write(buf.getvalue())
            self.offset = fp.tell()
            if full:
                fp.write(_EOF)
            fp.flush()
            os.fsync(fp.fileno())
        if created:
            fsync_dir(self.folder)
        if full:
            self.shard, self.offset, self.count = self.shard + 1, 0, 0
        else:
            self.count += len(entries)

    def remove(self, manifest: Manifest, item_ids: set[str]) -> None:
        # Tar shards are append-only, as webdataset readers expect: a changed image gets
        # a second sample with the same key, the later one current. One whose new bytes
        # fail keeps its earlier sample; the manifest and the errors file list it as
        # failed. (JSONL, parquet and sidecars drop the old caption.)
        manifest.commit(Commit.empty(), forget={self.stream: sorted(item_ids)})

    def close(self, manifest: Manifest) -> None:
        path = self.shard_path(self.shard)
        if self.offset and path.exists():
            with open(path, "ab") as fp:
                fp.write(_EOF)  # past the committed length: the next run cuts it off
                fp.flush()
                os.fsync(fp.fileno())


def _add_member(buf: io.BytesIO, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # the same bytes whatever the run or the time
    buf.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    buf.write(data)
    buf.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))


class ParquetOutput:
    stream = "parquet"

    def __init__(self, path: str | Path, binding: dict[str, str], *,
                 extra_columns: dict[str, str] | None = None) -> None:
        # extra_columns: record fields beyond the base ones, name -> pyarrow type name
        # ("float64", "bool"), so the file has them even when no record does.
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise OutputError("parquet output needs pyarrow: pip install pyarrow") from None
        self.path = Path(path)
        self.extra_columns = dict(extra_columns or {})
        self.staging = JsonlOutput(self.path.with_name(f".{self.path.name}.staging.jsonl"), self.stream, binding)

    def open(self, manifest: Manifest) -> None:
        self.staging.open(manifest)

    def write(self, entries: list[tuple[Item, dict[str, Any]]]) -> dict[str, Any]:
        return self.staging.write(entries)

    def remove(self, manifest: Manifest, item_ids: set[str]) -> None:
        self.staging.remove(manifest, item_ids)

    def close(self, manifest: Manifest) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with open(self.staging.path, "rb") as fp:
            records = [{k: _utf8(v) for k, v in json.loads(line).items()}
                       for line in fp.read(self.staging.offset).splitlines()]
        sink = io.BytesIO()
        schema = pa.schema([(name, pa.string()) for name in ("id", "path", "caption", "sha256", "model", "gen")]
                           + [(name, pa.type_for_alias(kind)) for name, kind in self.extra_columns.items()])
        pq.write_table(pa.Table.from_pylist(records, schema=schema), sink)
        replace_atomically(self.path, sink.getvalue())


def _utf8(value: Any) -> Any:
    """A string parquet can hold. A file name that is not UTF-8 reaches Python with its
    bad bytes as lone surrogates, which Arrow refuses; they are written as the escape
    the JSONL outputs use for them (\\udcff for the byte 0xff)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


class StreamOutput:
    """JSONL to a text stream (stdout): no files to reconcile, nothing kept."""

    stream = "stdout"

    def __init__(self, fp: Any) -> None:
        self.fp = fp

    def open(self, manifest: Manifest) -> None:
        """Nothing to reconcile: a stream keeps no state between runs."""

    def write(self, entries: list[tuple[Item, dict[str, Any]]]) -> dict[str, Any]:
        self.fp.write(encode_lines([r for _, r in entries]).decode("utf-8"))
        self.fp.flush()
        return {}

    def remove(self, manifest: Manifest, item_ids: set[str]) -> None:
        """Lines already written cannot be taken back; a rerun writes the new captions."""

    def close(self, manifest: Manifest) -> None:
        """Nothing to finish: every batch was flushed when written."""
