"""Training data: sources, decoding with skip-and-log, collate, deterministic sharding.

Stage 1 trains on images, stage 2 on (image, caption) pairs. Every source yields
records ``{"key": str, "image": ..., "caption": str | None}``:

* :class:`ShapesWorldSource` - Shapes World, sample ``i`` a pure function of ``(seed, i)``.
* :class:`ImageFolderSource` - image files under a folder; captions from a JSONL or
  parquet file, or from ``.txt`` sidecars next to the images (kohya style).
* :class:`WebDatasetSource` - tar shards in the webdataset layout, read with the
  standard library (iterable: it has no length and no random access).

Decoding goes through :func:`vlv_engine.images.load_image`, the project's one image
path. A sample whose image (or whole record) cannot be read is *skipped*: it is
logged on ``vlv.training.data`` at WARNING with its key and the reason, and recorded
as a :class:`Skipped` ``(key, reason)``; it never stops a run. Sources and the loader
keep these in ``.skipped``. Inside a :func:`make_loader` loader the records travel
through the batch (``batch["skipped"]``), so the count is right with worker processes
too, where each worker holds its own copy of the source.

The pipeline only decodes; resizing and normalising happen in the collate function
(:func:`make_collate`), which also tokenizes captions for stage 2.

Order is deterministic and resumable: :class:`ShardedSampler` draws one seeded
permutation per epoch, gives rank ``r`` the slice ``perm[r::world_size]`` (the same
count on every rank) and saves ``(epoch, position)``, so a resumed run continues with
exactly the next index. Iterable sources are split by shard file instead:
``shards[rank::world_size]``, then across DataLoader workers the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from vlv_engine import shapes
from vlv_engine.images import DEFAULT_MAX_PIXELS, ImageInputError, load_image, preprocess

__all__ = [
    "IMAGE_EXTENSIONS",
    "Collate",
    "ImageFolderSource",
    "MapSource",
    "SampleSkipped",
    "ShapesWorldSource",
    "ShardedSampler",
    "Skipped",
    "SkippingDataLoader",
    "WebDatasetSource",
    "build_source",
    "decode_record",
    "expand_shards",
    "make_collate",
    "make_loader",
]

logger = logging.getLogger("vlv.training.data")

#: Image files an :class:`ImageFolderSource` picks up (matched case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: Image members of a webdataset sample, in order of preference.
WDS_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Keys read, in order, for a path and a caption in a JSONL / parquet captions file.
CAPTION_PATH_FIELDS: tuple[str, ...] = ("path", "file", "key")
CAPTION_TEXT_FIELDS: tuple[str, ...] = ("caption", "text")

Record = dict[str, Any]


class Skipped(NamedTuple):
    """A sample that was not used, and why. A plain ``(key, reason)`` tuple."""

    key: str
    reason: str


class SampleSkipped(Exception):
    """Raised by ``source[i]`` for a sample that cannot be used (already logged and recorded)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.reason))


def _log_skip(skip: Skipped) -> None:
    logger.warning("skipping sample %r: %s", skip.key, skip.reason)


def decode_record(record: Mapping[str, Any], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Record | Skipped:
    """Decode ``record["image"]`` to an RGB PIL image; a :class:`Skipped` if it cannot be.

    Pure: logs nothing and records nothing (callers do). Other fields are kept.
    """
    key = str(record.get("key", "?"))
    try:
        image = load_image(record["image"], max_pixels=max_pixels)
    except ImageInputError as err:
        return Skipped(key, err.reason)
    except Exception as exc:  # a decoder bug or an unforeseen input must not stop a run
        return Skipped(key, f"unexpected error ({type(exc).__name__}: {exc})")
    caption = record.get("caption")
    if caption is not None and not isinstance(caption, str):
        return Skipped(key, f"caption is a {type(caption).__name__}, not a string")
    out = dict(record)
    out["image"] = image
    return out


# --- sources -----------------------------------------------------------------


class _SkipLog:
    """The ``skipped`` list shared by sources and the loader."""

    skipped: list[Skipped]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _skip(self, skip: Skipped) -> Skipped:
        _log_skip(skip)
        self.skipped.append(skip)
        return skip


class MapSource(_SkipLog, Dataset):
    """Base of the map-style sources.

    Subclasses define ``__len__``, ``key(i)`` and ``raw(i)`` (the record with the image
    still encoded: a path, bytes or an array). ``fetch(i)`` decodes and returns the
    record or a :class:`Skipped`; ``source[i]`` raises :class:`SampleSkipped` instead;
    iterating a source yields the good records only.
    """

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels
        self.skipped = []

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def raw(self, index: int) -> Record:
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {len(self)} samples")
        return index

    def fetch(self, index: int) -> Record | Skipped:
        index = self._check_index(index)
        try:
            record = self.raw(index)
        except Exception as exc:
            return self._skip(Skipped(self.key(index), f"cannot read sample ({type(exc).__name__}: {exc})"))
        out = decode_record(record, max_pixels=self.max_pixels)
        return self._skip(out) if isinstance(out, Skipped) else out

    def __getitem__(self, index: int) -> Record:
        out = self.fetch(index)
        if isinstance(out, Skipped):
            raise SampleSkipped(out.key, out.reason)
        return out

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            out = self.fetch(i)
            if not isinstance(out, Skipped):
                yield out


class ShapesWorldSource(MapSource):
    """``num_samples`` Shapes World scenes; sample ``i`` depends on ``(seed, i)`` only.

    Each sample draws from its own ``numpy.random.default_rng([seed, i])`` (scene, then
    jitter), so any subset, shard or resume point reproduces exactly, and ``num_samples``
    only bounds the index. Captions are the ground-truth ``shapes.caption``.
    """

    def __init__(self, num_samples: int, seed: int, jitter: int = 2, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(max_pixels)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.num_samples, self.seed, self.jitter = int(num_samples), int(seed), int(jitter)

    def __len__(self) -> int:
        return self.num_samples

    def key(self, index: int) -> str:
        return f"shapes/{self.seed}/{index}"

    def scene(self, index: int) -> shapes.Scene:
        """The scene of sample ``index`` (for evaluation)."""
        return shapes.sample_scene(np.random.default_rng([self.seed, self._check_index(index)]))

    def raw(self, index: int) -> Record:
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, index])
        scene = shapes.sample_scene(rng)
        image = shapes.render(scene, jitter=self.jitter, rng=rng)
        return {"key": self.key(index), "image": image, "caption": shapes.caption(scene)}

    def __repr__(self) -> str:
        return f"ShapesWorldSource(num_samples={self.num_samples}, seed={self.seed}, jitter={self.jitter})"


def _norm_relpath(name: str, root: Path) -> str:
    """A captions-file path as a key: relative to ``root``, posix separators, no ``./``."""
    p = Path(name)
    if p.is_absolute():
        try:
            p = p.relative_to(root)
        except ValueError:
            return p.as_posix()
    s = p.as_posix()
    while s.startswith("./"):
        s = s[2:]
    return s


def _first_field(entry: Mapping[str, Any], fields: Sequence[str]) -> Any:
    for f in fields:
        if f in entry and entry[f] is not None:
            return entry[f]
    return None


def _read_caption_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs of a JSONL or parquet captions file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"reading captions from a parquet file ({path}) needs pyarrow: pip install pyarrow "
                "(or convert the captions to JSONL)") from None
        rows = pq.read_table(path).to_pylist()
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
        return rows
    raise ValueError(f"captions file {path}: expected .jsonl or .parquet, got {path.suffix!r}")


class ImageFolderSource(MapSource):
    """Image files under ``root`` (recursively), keys = their paths relative to ``root``.

    Files are those with an extension in :data:`IMAGE_EXTENSIONS` (any case), sorted by
    key; hidden files and folders (names starting with ``.``) are ignored. Captions:

    * ``captions=None``: a ``.txt`` file next to the image with the same stem
      (``a/b.png`` -> ``a/b.txt``), stripped; no sidecar means caption None.
    * a ``.jsonl`` file: one object per line, the image in ``"path"``, ``"file"`` or
      ``"key"`` (relative to ``root``, or absolute under it; with or without the
      extension) and the text in ``"caption"`` or ``"text"``;
    * a ``.parquet`` file with the same columns (needs pyarrow);
    * a mapping ``key -> caption``.

    Images without a caption get None (stage 2's collate skips them, with a reason).
    """

    def __init__(self, root: str | os.PathLike, captions: str | os.PathLike | Mapping[str, str] | None = None, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(max_pixels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} does not exist or is not a directory")
        self.files: list[str] = self._scan(self.root)
        if not self.files:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}")
        self.sidecars = captions is None
        self.captions: dict[str, str] | None = None
        if captions is not None:
            self.captions = self._match_captions(captions)

    @staticmethod
    def _scan(root: Path) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(root)
            for name in filenames:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append((rel_dir / name).as_posix())
        return sorted(found)

    def _match_captions(self, captions: str | os.PathLike | Mapping[str, str]) -> dict[str, str]:
        if isinstance(captions, Mapping):
            rows = [(f"captions[{k!r}]", {"key": k, "caption": v}) for k, v in captions.items()]
        else:
            path = Path(captions)
            if not path.is_file():
                raise FileNotFoundError(f"captions file {path} not found")
            rows = _read_caption_rows(path)
        by_name: dict[str, str] = {}
        for where, row in rows:
            if not isinstance(row, Mapping):
                raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
            name = _first_field(row, CAPTION_PATH_FIELDS)
            text = _first_field(row, CAPTION_TEXT_FIELDS)
            if not isinstance(name, str) or not isinstance(text, str):
                raise ValueError(f"{where}: needs a string path ({'/'.join(CAPTION_PATH_FIELDS)}) and a string "
                                 f"caption ({'/'.join(CAPTION_TEXT_FIELDS)}), got fields {sorted(row)}")
            name = _norm_relpath(name, self.root)
            if name in by_name and by_name[name] != text:
                logger.warning("%s: a second caption for %r; the last one is used", where, name)
            by_name[name] = text.strip()
        out: dict[str, str] = {}
        used: set[str] = set()
        for key in self.files:
            for name in (key, os.path.splitext(key)[0]):
                if name in by_name:
                    out[key] = by_name[name]
                    used.add(name)
                    break
        unused = [n for n in by_name if n not in used]
        if unused:
            logger.warning("%d caption entries name no image under %s (e.g. %r)", len(unused), self.root, unused[0])
        missing = len(self.files) - len(out)
        if missing:
            logger.info("%d of %d images under %s have no caption", missing, len(self.files), self.root)
        return out

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return self.files[index]

    def caption(self, index: int) -> str | None:
        key = self.files[self._check_index(index)]
        if self.captions is not None:
            return self.captions.get(key)
        sidecar = (self.root / key).with_suffix(".txt")
        return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None

    def raw(self, index: int) -> Record:
        index = self._check_index(index)
        key = self.files[index]
        return {"key": key, "image": str(self.root / key), "caption": self.caption(index)}

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, {len(self.files)} images)"


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_shards(pattern: str | os.PathLike) -> list[str]:
    """Expand ``"data-{000..009}.tar"`` (zero padding kept) and ``"{a,b}.tar"``; several braces multiply."""
    pattern = os.fspath(pattern)
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = _RANGE.match(body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        lo, hi = int(a), int(b)
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        choices = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # not a pattern: keep the braces
        return [head + "{" + body + "}" + s for s in expand_shards(tail)]
    return [head + c + s for c in choices for s in expand_shards(tail)]


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    while name.startswith("./"):
        name = name[2:]
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


class WebDatasetSource(_SkipLog, IterableDataset):
    """Samples from webdataset tar shards, read with :mod:`tarfile` (no webdataset package).

    ``shards`` is a brace pattern (``"data-{000..009}.tar"``), a path, or a list of either.
    Consecutive members with the same key (the path up to the first dot of the file
    name) form a sample: the image is the first of ``jpg``/``jpeg``/``png``/``webp``, the
    caption the ``txt`` member (stripped) or else ``caption``/``text`` of the ``json``
    member. Samples come in shard order, members in tar order. Keys are the in-tar keys.

    This rank reads ``shards[rank::world_size]`` and, inside a DataLoader, worker ``w`` of
    ``W`` reads ``rank_shards[w::W]``. Ranks can hold different numbers of samples; a
    corrupt tar ends its shard with one logged skip (keyed by the shard path).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], *, rank: int = 0,
                 world_size: int = 1, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 split_by_worker: bool = True) -> None:
        self.skipped = []
        items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        self.shards: list[str] = [s for item in items for s in expand_shards(item)]
        if not self.shards:
            raise ValueError("no shards given")
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards not found, e.g. {missing[0]}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards cannot feed {world_size} ranks: every rank needs one")
        self.rank, self.world_size = rank, world_size
        self.max_pixels = max_pixels
        self.split_by_worker = split_by_worker

    def __len__(self) -> int:
        raise TypeError("a WebDatasetSource is iterable and has no length; give make_loader sampler=None "
                        "(its shards are split by rank instead)")

    @property
    def rank_shards(self) -> list[str]:
        return self.shards[self.rank::self.world_size]

    def worker_shards(self) -> list[str]:
        """The shards this process reads: this rank's, then this DataLoader worker's share."""
        mine = self.rank_shards
        info = get_worker_info()
        if info is not None and self.split_by_worker:
            mine = mine[info.id::info.num_workers]
            if not mine:
                logger.warning("DataLoader worker %d of %d has no shard (rank %d holds %d)",
                               info.id, info.num_workers, self.rank, len(self.rank_shards))
        return mine

    def fetch_iter(self) -> Iterator[Record | Skipped]:
        """Decoded records and (logged, recorded) skips, in order: what the loader consumes."""
        for shard in self.worker_shards():
            for item in self._read_shard(shard):
                if not isinstance(item, Skipped):
                    item = decode_record(item, max_pixels=self.max_pixels)
                yield self._skip(item) if isinstance(item, Skipped) else item

    def __iter__(self) -> Iterator[Record]:
        for item in self.fetch_iter():
            if not isinstance(item, Skipped):
                yield item

    def _read_shard(self, shard: str) -> Iterator[Record | Skipped]:
        name = os.path.basename(shard)
        count = 0
        try:
            # Streaming mode: one sequential pass, the way shards are meant to be read.
            with tarfile.open(shard, mode="r|*") as tar:
                key, parts = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    mkey, ext = _split_member(member.name)
                    if mkey != key:
                        if key is not None:
                            count += 1
                            yield self._make_record(key, parts, name)
                        key, parts = mkey, {}
                    f = tar.extractfile(member)
                    parts[ext] = f.read() if f is not None else b""
                if key is not None:
                    count += 1
                    yield self._make_record(key, parts, name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield Skipped(shard, f"unreadable tar shard after {count} samples, rest of the shard "
                                 f"skipped ({type(exc).__name__}: {exc})")

    @staticmethod
    def _make_record(key: str, parts: dict[str, bytes], shard_name: str) -> Record | Skipped:
        image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
        if image_ext is None:
            return Skipped(key, f"no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)}) in shard {shard_name}; "
                                f"has {sorted(parts) or 'nothing'}")
        caption = None
        try:
            if "txt" in parts:
                caption = parts["txt"].decode("utf-8").strip()
            elif "json" in parts:
                meta = json.loads(parts["json"].decode("utf-8"))
                text = _first_field(meta, CAPTION_TEXT_FIELDS) if isinstance(meta, dict) else None
                caption = text.strip() if isinstance(text, str) else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Skipped(key, f"unreadable caption in shard {shard_name} ({type(exc).__name__}: {exc})")
        return {"key": key, "image": parts[image_ext], "caption": caption}

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, rank={self.rank}, world_size={self.world_size})"


def build_source(cfg: Any, *, rank: int = 0, world_size: int = 1) -> MapSource | WebDatasetSource:
    """A source from a data config (``source``, ``path``, ``captions``, ``num_samples``,
    ``seed``, ``jitter``, ``max_pixels``; ``max_pixels=None`` means the project default).

    ``rank``/``world_size`` only matter for ``webdataset``, which shards by file; map-style
    sources are sharded by :class:`ShardedSampler`.
    """
    max_pixels = getattr(cfg, "max_pixels", None) or DEFAULT_MAX_PIXELS
    kind = cfg.source
    if kind == "shapes":
        return ShapesWorldSource(cfg.num_samples, cfg.seed, cfg.jitter, max_pixels=max_pixels)
    if not cfg.path:
        raise ValueError(f"data source {kind!r} needs data.path")
    if kind == "folder":
        return ImageFolderSource(cfg.path, getattr(cfg, "captions", None), max_pixels=max_pixels)
    if kind == "webdataset":
        return WebDatasetSource(cfg.path, rank=rank, world_size=world_size, max_pixels=max_pixels)
    raise ValueError(f"unknown data source {kind!r}; expected shapes, folder or webdataset")


# --- sampler -------------------------------------------------------------------


class ShardedSampler(Sampler[int]):
    """This rank's indices for one epoch, in a seeded order that a resumed run continues.

    The epoch's order is ``default_rng([seed, epoch]).permutation(num_samples)`` (or
    ``0..n-1`` without shuffle). ``drop_last=True`` keeps its first
    ``world_size * (n // world_size)`` entries, ``drop_last=False`` repeats its head to
    reach a multiple of ``world_size``; rank ``r`` gets ``order[r::world_size]``, so every
    rank gets ``len(self)`` indices.

    ``position`` counts the indices of the current epoch already handed out (by the
    loader: consumed). ``state_dict()`` saves ``(epoch, position)``; after
    ``load_state_dict`` the next pass starts at that position. ``set_epoch(e)`` with a new
    ``e`` starts that epoch from its beginning (the same ``e`` keeps a loaded position,
    so ``load_state_dict`` then the usual ``set_epoch`` works). A pass that was not
    resumed always starts at 0. A state saved after an epoch's last index loads as the
    start of the next epoch (so the resumed pass is never empty).
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if drop_last:
            self.num_per_rank = self.num_samples // self.world_size
        else:
            self.num_per_rank = math.ceil(self.num_samples / self.world_size)
        if self.num_samples and not self.num_per_rank:
            raise ValueError(f"{num_samples} samples cannot feed {world_size} ranks with drop_last=True")
        self.epoch = 0
        self.position = 0
        self._resume = False

    def __len__(self) -> int:
        return self.num_per_rank

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's full order over all ranks (trimmed or padded to a multiple of world_size)."""
        epoch = self.epoch if epoch is None else epoch
        n, total = self.num_samples, self.num_per_rank * self.world_size
        if self.shuffle:
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
        else:
            perm = np.arange(n)
        if total <= n:
            return perm[:total]
        return np.concatenate([perm, np.resize(perm, total - n)])  # np.resize repeats from the start

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's indices for an epoch, in order."""
        return [int(i) for i in self.order(epoch)[self.rank::self.world_size]]

    @property
    def start_position(self) -> int:
        """Where the next pass starts: the loaded position, or 0."""
        return self.position if self._resume else 0

    def __iter__(self) -> Iterator[int]:
        start = self.start_position
        self._resume = False
        idx = self.indices()
        self.position = start
        for cursor in range(start, len(idx)):
            self.position = cursor + 1
            yield idx[cursor]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self._resume = int(epoch), 0, False

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state. Any rank's state will do (every rank has the same
        position); the order-defining settings must match, or the position would mean
        other samples."""
        for name in ("seed", "num_samples", "world_size", "shuffle", "drop_last"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"data state was saved with {name}={state[name]!r}, this sampler has "
                                 f"{name}={getattr(self, name)!r}: the saved position does not apply")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self.num_per_rank:
            raise ValueError(f"data state position {position} is outside 0..{self.num_per_rank}")
        if position == self.num_per_rank and self.num_per_rank:
            # Saved after the epoch's last batch: what comes next is the next epoch.
            epoch, position = epoch + 1, 0
        self.epoch, self.position, self._resume = epoch, position, True


# --- collate ---------------------------------------------------------------------


class Collate:
    """Turns a list of records / :class:`Skipped` into a batch (a picklable callable;
    see :func:`make_collate`)."""

    def __init__(self, image_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float], *,
                 tokenizer: Any = None, max_caption_tokens: int | None = None, vae_size: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.image_size = image_size if isinstance(image_size, int) else tuple(image_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
        if max_caption_tokens is not None and max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens must be >= 1 or None, got {max_caption_tokens}")
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_caption_tokens
        self.vae_size = vae_size
        self.max_pixels = max_pixels
        self.eos_id = self.pad_id = None
        if tokenizer is not None:
            self.eos_id = tokenizer.eos_token_id
            if self.eos_id is None:
                raise ValueError("the tokenizer has no eos_token_id: captions need an EOS to learn to stop")
            pad = tokenizer.pad_token_id
            self.pad_id = self.eos_id if pad is None else pad

    def tokenize(self, caption: str) -> list[int]:
        """The caption's ids, ending in one EOS (unless truncated to ``max_caption_tokens``:
        a cut caption gets no EOS, so the model is not taught to stop mid-sentence)."""
        ids = [int(i) for i in self.tokenizer(caption)["input_ids"]]
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        if self.max_caption_tokens is not None and len(ids) > self.max_caption_tokens:
            ids = ids[:self.max_caption_tokens]
        return ids

    def __call__(self, items: Sequence[Record | Skipped]) -> dict[str, Any]:
        keys: list[str] = []
        images: list[Image.Image] = []
        captions: list[str | None] = []
        skipped: list[Skipped] = []

        def skip(s: Skipped) -> None:
            _log_skip(s)
            skipped.append(s)

        for item in items:
            if isinstance(item, Skipped):
                skipped.append(item)  # already logged where it was read
                continue
            key = str(item.get("key", "?"))
            image, caption = item.get("image"), item.get("caption")
            if not (isinstance(image, Image.Image) and image.mode == "RGB"):
                # Records straight from user code (arrays, paths): decode them here.
                out = decode_record(item, max_pixels=self.max_pixels)
                if isinstance(out, Skipped):
                    skip(out)
                    continue
                image = out["image"]
            if self.tokenizer is not None and (not isinstance(caption, str) or not caption.strip()):
                skip(Skipped(key, "empty caption" if isinstance(caption, str) else "no caption (stage 2 needs one)"))
                continue
            keys.append(key)
            images.append(image)
            captions.append(caption)

        batch: dict[str, Any] = {
            "keys": keys,
            "captions": captions,
            "pixel_values": preprocess(images, self.image_size, self.mean, self.std),
            "skipped": skipped,
        }
        if self.vae_size is not None:
            # The VAE's input range, [-1, 1].
            batch["vae_pixel_values"] = preprocess(images, self.vae_size, (0.5,) * 3, (0.5,) * 3)
        if self.tokenizer is not None:
            rows = [self.tokenize(c) for c in captions]
            width = max((len(r) for r in rows), default=0)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                attention_mask[i, :len(row)] = 1
            # From the lengths, not from pad ids: with pad == eos the EOS is still trained.
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return batch


def make_collate(image_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 tokenizer: Any = None, max_caption_tokens: int | None = None, *, vae_size: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Collate:
    """The collate function: records -> batch dict.

    ``{"keys": [str], "captions": [str | None], "pixel_values": float [B, 3, S, S]
    (resized and normalised by vlv_engine.images.preprocess), "skipped": [(key, reason)]}``,
    plus ``"vae_pixel_values"`` (``[B, 3, V, V]`` in [-1, 1]) when ``vae_size`` is given,
    and ``"input_ids"`` / ``"attention_mask"`` / ``"labels"`` (long ``[B, T]``) when a
    tokenizer is: each caption's ids plus one EOS (none added when the tokenizer already
    ends with it), right-padded with the pad id (EOS when there is none); labels are the
    ids with -100 on padding only, so the EOS is trained.

    :class:`Skipped` items are dropped into ``"skipped"``; with a tokenizer, records
    without a caption are skipped (logged) too. Images that are not yet RGB PIL images
    are decoded here with ``max_pixels``. A batch can therefore hold fewer rows than
    items, or none.
    """
    return Collate(image_size, mean, std, tokenizer=tokenizer, max_caption_tokens=max_caption_tokens,
                   vae_size=vae_size, max_pixels=max_pixels)


# --- loader -----------------------------------------------------------------------


class _MapFetch(Dataset):
    """Map-style view whose items are records or :class:`Skipped`, never exceptions."""

    def __init__(self, source: Dataset) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record | Skipped:
        if isinstance(self.source, MapSource):
            return self.source.fetch(index)
        try:  # any other dataset of records (a Subset of a source, user code)
            record = self.source[index]
            if not isinstance(record, Mapping) or "image" not in record:
                raise TypeError(f"expected a record dict with an 'image', got {type(record).__name__}")
        except SampleSkipped as exc:  # already logged by the source
            return Skipped(exc.key, exc.reason)
        except Exception as exc:
            out = Skipped(f"#{index}", f"cannot read sample ({type(exc).__name__}: {exc})")
            _log_skip(out)
            return out
        if isinstance(record.get("image"), Image.Image) and record["image"].mode == "RGB":
            return record
        out = decode_record(record, max_pixels=getattr(self.source, "max_pixels", DEFAULT_MAX_PIXELS))
        if isinstance(out, Skipped):
            _log_skip(out)
        return out


class _IterFetch(IterableDataset):
    def __init__(self, source: WebDatasetSource) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Record | Skipped]:
        return self.source.fetch_iter()


class SkippingDataLoader(_SkipLog, DataLoader):
    """A DataLoader over records that drops failed samples instead of failing.

    Batches come from the collate function with the failed items in
    ``batch["skipped"]``; this loader adds them to ``self.skipped`` and does not yield a
    batch that has no rows left (``len(loader)`` is therefore an upper bound). With a
    :class:`ShardedSampler` it also keeps ``sampler.position`` at the number of samples
    *consumed*, not the number prefetched by workers, so ``sampler.state_dict()`` taken
    between batches resumes exactly after the last batch received.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        sampler = self.sampler if isinstance(self.sampler, ShardedSampler) else None
        start = sampler.start_position if sampler is not None else 0
        consumed = 0
        for batch in super().__iter__():
            skipped = batch.get("skipped", [])
            consumed += len(batch["keys"]) + len(skipped)
            if sampler is not None:
                sampler.position = start + consumed
            self.skipped.extend(skipped)
            if batch["keys"]:
                yield batch
        if sampler is not None:
            # The pass is complete, including a short last batch that drop_last dropped.
            sampler.position = len(sampler)


def make_loader(source: Dataset, sampler: Sampler[int] | None, collate: Callable[[list], dict[str, Any]],
                batch_size: int, num_workers: int = 0, *, drop_last: bool = False, pin_memory: bool = False,
                persistent_workers: bool = False, prefetch_factor: int | None = None,
                multiprocessing_context: Any = None) -> SkippingDataLoader:
    """A :class:`SkippingDataLoader` over ``source``.

    Map-style sources are read in ``sampler``'s order (None: ``0..n-1``); failed samples
    are returned as :class:`Skipped` by the fetch layer (workers never raise on bad data)
    and dropped by ``collate`` (made by :func:`make_collate`). Iterable sources
    (:class:`WebDatasetSource`) take ``sampler=None``: they shard by file.
    ``drop_last`` drops a short *last* batch of the pass, not batches shortened by skips.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, IterableDataset):
        if sampler is not None:
            raise ValueError(f"{type(source).__name__} is iterable and shards by file (rank/world_size); "
                             "pass sampler=None")
        dataset: Dataset = _IterFetch(source) if isinstance(source, WebDatasetSource) else source
    else:
        dataset = _MapFetch(source)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=persistent_workers, multiprocessing_context=multiprocessing_context)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    # A private generator: each new loader iterator draws a base seed from it, and drawing
    # from the global RNG instead would shift dropout after a resume (samples themselves
    # depend only on their index).
    return SkippingDataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                              generator=torch.Generator().manual_seed(0), **kwargs)
