"""Where a batch job's images come from: files, folders, globs, @lists, tar shards, parquet.

Each input becomes an :class:`Item`: a stable ``item_id`` (what the manifest and the
outputs are keyed by), the ``path`` shown to people, and a small picklable ``source``
that a decode worker reads the bytes from.  Enumeration reads only directory
listings, ``stat``, tar headers and parquet metadata, never image bytes, so a rerun
over millions of finished items costs no image I/O.

Spec rules (in this order):

* ``@list.txt``: one spec per line (blank lines and ``#`` comments skipped); relative
  entries are relative to the list file's folder, so a list travels with its data.
* an existing folder: its image files, recursively, sorted (as ``vlv caption`` always did).
* ``*.tar``: a webdataset shard; each image member (jpg/jpeg/png/webp) is an item
  keyed by its member path without extension.  Only the first image of a sample is
  used (webdataset samples hold one image).
* ``*.parquet``: one item per row of its image column (bytes, a path, or a
  ``{bytes, path}`` struct as Hugging Face datasets write); needs pyarrow.
* a pattern with ``*``, ``?`` or ``[`` that is not an existing path: a recursive glob,
  sorted; of its matches, folders are expanded (except under ``**``, whose file
  matches are enough) and files are kept if they are images, tar shards or parquet.
* anything else: one file, even if missing (it is then reported per item, not here).

An item listed twice (the same ``item_id``) is kept once, at its first position.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_SUFFIXES",
    "FileSource",
    "InputSpecError",
    "Item",
    "MAX_FILE_BYTES",
    "ParquetCellSource",
    "TarMemberSource",
    "UnreadableInput",
    "collect_items",
    "iter_items",
    "read_bytes",
    "read_file",
    "shard_of",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TAR_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Column names tried, in order, when a parquet file's image column is not named.
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
_GLOB_CHARS = frozenset("*?[")
_GLOB_SUFFIXES = IMAGE_SUFFIXES | {".tar", ".parquet"}


class InputSpecError(ValueError):
    """An input spec that cannot be used at all (a usage error, not a bad image)."""


@dataclass(frozen=True, slots=True)
class FileSource:
    path: str


@dataclass(frozen=True, slots=True)
class TarMemberSource:
    shard: str
    offset: int  # of the member's data, so a worker reads it with one seek
    size: int


@dataclass(frozen=True, slots=True)
class ParquetCellSource:
    file: str
    row_group: int
    row: int  # within the row group
    column: str


Source = FileSource | TarMemberSource | ParquetCellSource


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    path: str
    key: str  # webdataset sample key for tar outputs
    source: Source
    # Cheap change detector (sizes, mtimes, offsets): an item whose fingerprint is
    # unchanged since the manifest saw it is trusted to have the same content hash.
    fingerprint: str

    def read_bytes(self) -> bytes:
        return read_bytes(self.source)


def iter_items(specs: Sequence[str], *, image_column: str | None = None) -> Iterator[Item]:
    """Every item the specs name, in order, each ``item_id`` once."""
    seen: set[str] = set()
    for spec in specs:
        for item in _expand(os.fspath(spec), image_column, depth=0):
            if item.item_id not in seen:
                seen.add(item.item_id)
                yield item


def collect_items(specs: Sequence[str], *, image_column: str | None = None, shard_index: int = 0,
                  num_shards: int = 1) -> list[Item]:
    """The items of one shard (``shard_of(item_id) == shard_index``), in input order."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InputSpecError(f"shard index {shard_index} is not in [0, {num_shards})")
    items = iter_items(specs, image_column=image_column)
    if num_shards == 1:
        return list(items)
    return [it for it in items if shard_of(it.item_id, num_shards) == shard_index]


def shard_of(item_id: str, num_shards: int) -> int:
    """A stable shard for an item: the same on every machine, Python version and run
    (``hash()`` is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


MAX_FILE_BYTES = 1 << 30  # one image file; far above any image within the pixel limit


class UnreadableInput(OSError):
    """An input path that is not an image file to read: a FIFO, a device, or too large."""


def read_file(path: str) -> bytes:
    """A regular file's bytes, at most `MAX_FILE_BYTES`. Opened without blocking: a FIFO
    would wait for a writer forever (and stall the whole run behind it); /dev/zero or a
    huge sparse file would be read until memory runs out."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fp:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
            raise UnreadableInput(f"not a regular file ({kind})")
        if st.st_size > MAX_FILE_BYTES:
            raise UnreadableInput(f"{st.st_size} bytes, over the {MAX_FILE_BYTES >> 20} MiB limit for one image file")
        data = fp.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:  # it grew while being read
        raise UnreadableInput(f"over the {MAX_FILE_BYTES >> 20} MiB limit for one image file")
    return data


def read_bytes(source: Source) -> bytes:
    """The encoded bytes of one item (raises OSError / ValueError on failure)."""
    if isinstance(source, FileSource):
        return read_file(source.path)
    if isinstance(source, TarMemberSource):
        with open(source.shard, "rb") as fp:
            fp.seek(source.offset)
            data = fp.read(source.size)
        if len(data) != source.size:
            raise OSError(f"tar member cut short: {len(data)} of {source.size} bytes (shard changed?)")
        return data
    if isinstance(source, ParquetCellSource):
        return _read_parquet_cell(source)
    raise TypeError(f"unknown source {source!r}")


# --- expansion --------------------------------------------------------------


def _expand(spec: str, image_column: str | None, depth: int, base: str = "") -> Iterator[Item]:
    if spec.startswith("@"):
        if depth > 0:
            raise InputSpecError(f"nested list files are not supported: {spec!r}")
        yield from _from_list(spec[1:], image_column)
        return
    path = os.path.join(base, spec) if base else spec
    if os.path.isdir(path):
        yield from _from_folder(path)
    elif path.lower().endswith(".tar") and os.path.isfile(path):
        yield from _from_tar(path)
    elif path.lower().endswith(".parquet") and os.path.isfile(path):
        yield from _from_parquet(path, image_column)
    elif _GLOB_CHARS & set(spec) and not os.path.exists(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            log.warning("pattern %r matches nothing", path)
        for match in matches:
            if os.path.isdir(match):
                if "**" not in spec:  # "**" also matches every file inside
                    yield from _from_folder(match)
            elif os.path.splitext(match)[1].lower() in _GLOB_SUFFIXES:
                yield from _expand(match, image_column, depth + 1)
    else:
        yield _file_item(path)


def _from_list(list_path: str, image_column: str | None) -> Iterator[Item]:
    try:
        with open(list_path, encoding="utf-8") as fp:
            lines = fp.read().splitlines()
    except OSError as exc:
        raise InputSpecError(f"cannot read list file {list_path!r}: {exc.strerror or exc}") from None
    base = os.path.dirname(list_path)
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield from _expand(entry, image_column, depth=1, base=base)


def _from_folder(folder: str) -> Iterator[Item]:
    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for p in found:
        yield _file_item(str(p))


def _file_item(path: str) -> Item:
    item_id = os.path.abspath(path)
    return Item(item_id, path, _key(item_id), FileSource(path), _file_fingerprint(path))


def _file_fingerprint(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"file:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _key(item_id: str) -> str:
    # Webdataset splits a member name at the first dot of its basename, so the key
    # keeps the folders and drops every dot of the basename's stem.
    head, tail = os.path.split(os.path.splitext(item_id)[0])
    return os.path.join(head, tail.replace(".", "_")).lstrip("/")


def _from_tar(shard: str) -> Iterator[Item]:
    st = os.stat(shard)
    shard_id = os.path.abspath(shard)
    seen: set[str] = set()
    try:
        # "r:" (not streaming "r|"): the headers are read and the data seeked over,
        # so enumerating a shard costs its headers only.
        with tarfile.open(shard, "r:") as tf:
            for member in tf:
                stem, suffix = os.path.splitext(member.name)
                if not member.isfile() or suffix.lower() not in TAR_IMAGE_SUFFIXES:
                    continue
                if stem in seen:
                    log.warning("%s: sample %r has more than one image; using the first", shard, stem)
                    continue
                seen.add(stem)
                fingerprint = f"tar:{st.st_size}:{st.st_mtime_ns}:{member.offset_data}:{member.size}"
                yield Item(f"{shard_id}::{stem}", f"{shard}::{stem}", stem.lstrip("/"),
                           TarMemberSource(shard, member.offset_data, member.size), fingerprint)
    except tarfile.TarError as exc:
        # A shard truncated mid-member keeps the members before the break.
        log.warning("%s: tar shard unreadable past this point (%s)", shard, exc)


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputSpecError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


def _from_parquet(file: str, image_column: str | None) -> Iterator[Item]:
    pq = _pyarrow_parquet()
    st = os.stat(file)
    meta = pq.ParquetFile(file)
    names = meta.schema_arrow.names
    column = image_column or next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
    if column is None or column not in names:
        raise InputSpecError(f"{file}: no image column {'named ' + repr(image_column) if image_column else ''} "
                             f"(columns: {names}); name it with --image-column")
    file_id = os.path.abspath(file)
    stem = _key(file_id)
    fingerprint = f"parquet:{st.st_size}:{st.st_mtime_ns}"
    # Cells holding paths: the image is another file, which can change while the parquet
    # file does not, so each row's fingerprint also has that file's. Only the paths are
    # read here (per row group; of an Image struct, its path field, never its bytes).
    paths = _path_leaf(column, meta.schema_arrow.field(column).type)
    row = 0
    for group in range(meta.num_row_groups):
        cells = meta.read_row_group(group, columns=[paths]).column(0).to_pylist() if paths else None
        for local in range(meta.metadata.row_group(group).num_rows):
            own = fingerprint
            if cells is not None and (path := _cell_file(cells[local])) is not None:
                own = f"{fingerprint}:{_file_fingerprint(_cell_path(file, path))}"
            yield Item(f"{file_id}::{row}", f"{file}::{row}", f"{stem}/{row:09d}",
                       ParquetCellSource(file, group, local, column), own)
            row += 1


def _path_leaf(column: str, arrow_type) -> str | None:
    """What to read of an image column for the paths its cells may name: the column when
    it is text, its path field when it is a struct with one (Hugging Face datasets' Image
    feature), else None (bytes only)."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        fields = {arrow_type.field(i).name for i in range(arrow_type.num_fields)}
        return f"{column}.path" if "path" in fields else None
    return column if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) else None


def _cell_file(value: Any) -> str | None:
    """The file a cell names: a text cell, or an Image struct's path. (A struct that also
    holds bytes is read from them; its path's fingerprint then only costs a recheck.)"""
    if isinstance(value, dict):
        value = value.get("path")
    return value if isinstance(value, str) else None


def _cell_path(parquet_file: str, value: str) -> str:
    """A path cell, relative to the parquet file's folder unless absolute."""
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(parquet_file), value)


# One row group column per worker process: items arrive in order, so consecutive
# reads hit the same group and a group is decoded once, not once per row.
_parquet_cache: dict[tuple[str, int, str], list] = {}


def _read_parquet_cell(source: ParquetCellSource) -> bytes:
    key = (source.file, source.row_group, source.column)
    values = _parquet_cache.get(key)
    if values is None:
        pq = _pyarrow_parquet()
        table = pq.ParquetFile(source.file).read_row_group(source.row_group, columns=[source.column])
        values = table.column(0).to_pylist()
        _parquet_cache.clear()
        _parquet_cache[key] = values
    value = values[source.row]
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return read_file(_cell_path(source.file, value))
    raise ValueError(f"parquet cell is {type(value).__name__}, not image bytes or a path")

