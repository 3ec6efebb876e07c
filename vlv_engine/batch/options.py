"""What a batch captioning job is asked to do, and where its files go."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlv_engine.images import DEFAULT_MAX_PIXELS

__all__ = ["JobOptions", "JobPaths", "RunSummary", "UsageError"]


class UsageError(ValueError):
    """The job cannot start as asked (exit status 2)."""


@dataclass
class JobOptions:
    # jsonl / parquet: a file; tar: a folder; txt: unused (sidecars go next to the
    # images).  jsonl with None streams to ``stream`` (stdout): no state, no resume.
    out: str | Path | None = None
    format: str | None = None  # jsonl | txt | tar | parquet; None: from out's suffix (.parquet), else jsonl
    manifest: str | Path | None = None  # default: beside the output
    errors: str | Path | None = None  # default: beside the output
    batch_size: int = 8
    workers: int = 2  # decode processes; 0 decodes in this process
    max_in_flight: int | None = None  # decoded batches waiting (default 2 x workers)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    shard_index: int = 0
    num_shards: int = 1
    retry_failed: bool = False
    flush_seconds: float = 1.0  # write + fsync + commit at most this often (0: every batch)
    embedding_cache: str | Path | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    image_column: str | None = None  # parquet inputs
    progress: bool = False
    tar_max_per_shard: int = 10_000
    stream: Any = None  # a text stream for out=None (default sys.stdout)
    # Redraw each image from its caption embedding and score the caption's fidelity
    # (``selfcheck.py``): a ``SelfCheckOptions``, or True for its defaults.
    self_check: Any = None
    # Run the model on a pool of Ray actors (``ray_runner.py``; needs the ``ray`` extra).
    ray: bool = False
    ray_address: str | None = None  # "auto" (a running cluster), "local" (start one), an address; None: auto, else local
    ray_actors: int | None = None  # engine actors (default: one per GPU, else one per 2 CPUs of the cluster)
    ray_gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    # Builds each actor's engine (picklable, e.g. functools.partial(Engine.from_pretrained,
    # path, device="cuda")); None ships the driver's engine to the actors as it is.
    engine_factory: Any = None

    def __post_init__(self) -> None:
        if self.format is None:  # as the command line infers it
            self.format = "parquet" if self.out is not None and str(self.out).lower().endswith(".parquet") else "jsonl"


@dataclass(frozen=True)
class JobPaths:
    out: Path | None
    manifest: Path | None  # None: a temporary one (streaming to stdout)
    errors: Path | None  # None: failures are only reported, not written
    tar_prefix: str

    @classmethod
    def resolve(cls, options: JobOptions) -> "JobPaths":
        """Defaults beside the output; with ``num_shards > 1`` every file name (the
        output, the manifest and the errors, given or default) gets ``.SSSSS-of-NNNNN``
        so array tasks never share a file. Paths that would share a file are refused."""
        paths = cls._resolve(options)
        paths._check()
        return paths

    @classmethod
    def _resolve(cls, options: JobOptions) -> "JobPaths":
        tag = f".{options.shard_index:05d}-of-{options.num_shards:05d}" if options.num_shards > 1 else ""
        fmt = options.format
        given_errors = _tagged(Path(options.errors), tag) if options.errors else None
        given_manifest = _tagged(Path(options.manifest), tag) if options.manifest else None
        if fmt == "txt":
            if given_manifest is None:
                raise UsageError("txt sidecars need --manifest PATH (where the job's state is kept)")
            return cls(None, given_manifest,
                       given_errors or given_manifest.with_name(f"{given_manifest.stem}.errors.jsonl"), "")
        if options.out is None:
            if fmt != "jsonl":
                raise UsageError(f"{fmt} output needs an output path")
            return cls(None, None, given_errors, "")
        out = Path(options.out)
        if fmt == "tar":
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out}: tar output is a folder of shards, and this is a file")
            return cls(out, given_manifest or out / f"manifest{tag}.sqlite",
                       given_errors or out / f"errors{tag}.jsonl", f"captions{tag}")
        out = _tagged(out, tag)
        if out.is_dir():
            raise UsageError(f"--out {out}: {fmt} output is a file, and this is a folder")
        return cls(out, given_manifest or out.with_name(f"{out.name}.manifest.sqlite"),
                   given_errors or out.with_name(f"{out.stem}.errors.jsonl"), "")

    def _check(self) -> None:
        # Two streams in one file cut each other back to their own committed lengths on
        # every resume (and errors written into the manifest would destroy it).
        named = [(flag, path) for flag, path in (("--out", self.out), ("--manifest", self.manifest),
                                                  ("--errors", self.errors)) if path is not None]
        seen: dict[str, str] = {}
        for flag, path in named:
            key = os.path.realpath(path)
            if key in seen:
                raise UsageError(f"{seen[key]} and {flag} name the same file ({path}); give each its own")
            seen[key] = flag


def _tagged(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}{tag}{path.suffix}") if tag else path


@dataclass
class RunSummary:
    total: int = 0  # items in this job (this shard)
    already_done: int = 0  # finished before this run, skipped without reading
    captioned: int = 0  # captions computed by the model in this run
    reused: int = 0  # written from earlier results (same bytes elsewhere, a lost output record)
    failed: int = 0  # items that are failed now (new, and earlier ones not retried)
    flagged: int = 0  # records written in this run that the self-check flagged (self_check_low)
    seconds: float = 0.0
    paths: JobPaths | None = None

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0

    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds else 0.0
